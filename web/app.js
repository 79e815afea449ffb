// streamgen browser client: WHEP (WebRTC) first, the WebSocket API as the fallback.
// Plain modern JS, no build step. Query parameters for automation:
//   ?autostart=1  connect on load      ?avatar=ada   preselect an avatar
//   ?mic=0        start without mic    ?transport=ws skip WebRTC
//   ?token=T      the server token, on a server started with --token
import { Resampler, toPcm16 } from "./resample.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const SAMPLE_RATE = 16000;
const HEADER_BYTES = 16;
// How long a WebSocket connect may take, from the socket's creation to the server's "ready" (its
// answer to the start message; the server sends it at once). The browser sets no limit of its own:
// a server or proxy that took the TCP connection and then said nothing left the page "connecting"
// (or "streaming" with nothing coming) for good. Generous: a real server answers within a second.
const WEBSOCKET_START_MS = 10000;
// How long a hang-up waits for the server to answer its WebSocket's close before it DELETEs the
// session (deleteUnlessTheSocketEndsIt). A real server answers at once.
const SOCKET_CLOSE_ANSWER_MS = 2000;

// what the overlay shows; tests read it as window.streamgenStats
const stats = { transport: null, firstFrameMs: null, framesDecoded: 0, fps: 0, avOffsetMs: null,
  rttMs: null, state: "idle", error: null, trickled: 0 };
window.streamgenStats = stats;

let avatar = params.get("avatar") || "sample";
let session = null;        // {id, token, resource, whep, stream, ice_servers}
let pc = null;             // RTCPeerConnection (WebRTC)
let ws = null;             // WebSocket (fallback)
let wsStarted = false;     // its server answered the start message ("ready"): it holds the session
let mic = null;            // MediaStream from getUserMedia
let audioSender = null;    // RTCRtpSender carrying the mic
let statsTimer = null;
let offerPostedAt = 0;
// Each connect and each hang-up starts a new generation: the late events of an older connection
// (a socket's close, a peer's state change, a microphone granted after hanging up) do nothing.
let generation = 0;
// Thrown where a connect attempt finds it was hung up (or replaced) while it waited: the page,
// its peer connection and its session are another generation's now (connect says nothing).
const abandoned = (mine) => {
  if (mine !== generation) throw new Error("hung up while connecting");
};
let lostTimer = null;      // a WebRTC connection "disconnected": ended unless it comes back

function resetStats() {
  Object.assign(stats, { transport: null, firstFrameMs: null, framesDecoded: 0, fps: 0, avOffsetMs: null,
    rttMs: null, error: null, trickled: 0, avMethod: undefined });
  frameTimes = [];
}

function setStatus(text) {
  stats.state = text;
  $("status").textContent = text;
}

function showOverlay() {
  const f = (v, unit) => (v === null || v === undefined ? "–" : `${Math.round(v)} ${unit}`);
  $("overlay").textContent = [
    `transport  ${stats.transport || "–"}`,
    `startup    ${f(stats.firstFrameMs, "ms")}`,
    `fps        ${stats.fps ? stats.fps.toFixed(1) : "–"}`,
    `A/V offset ${f(stats.avOffsetMs, "ms")}`,
    `RTT        ${f(stats.rttMs, "ms")}`,
    `frames     ${stats.framesDecoded}`,
  ].join("\n");
}

// Sound that waits for a click. Browsers give a page sound (a <video> unmuted, an AudioContext
// running) only once the user has interacted with it, so a page that connected by itself
// (?autostart=1) plays muted, or keeps its AudioContext suspended. The page says so, and the first
// click, tap or key anywhere on it turns the sound on.
let soundWaits = false;
function waitForClickForSound() {
  soundWaits = true;
  $("sound").hidden = false;
}
function soundOn() {
  if (!soundWaits) return;
  soundWaits = false;
  $("sound").hidden = true;
  const video = $("video");
  if (pc && video.muted) { video.muted = false; video.play().catch(() => {}); }
  if (audioCtx && audioCtx.state === "suspended") audioCtx.resume().catch(() => {});
}
for (const type of ["click", "keydown", "touchend"]) document.addEventListener(type, soundOn, true);

function authHeaders(s, extra = {}) {
  return { Authorization: `Bearer ${s.token}`, ...extra };
}

// An answer of the API: its JSON, or for an error an Error with the server's message. An answer
// that is not the API's JSON (a proxy's error page, a server restarting) is its HTTP status: it
// was JSON.parse's complaint about the body ("Unexpected token '<'").
async function apiJson(res) {
  const isJson = (res.headers.get("Content-Type") || "").includes("json");
  const json = isJson ? await res.json().catch(() => null) : null;
  if (!res.ok) throw new Error(`${res.status}: ${(json && (json.message || json.error)) || res.statusText || "error"}`);
  if (json === null) throw new Error(`${res.status}: the answer is not JSON`);
  return json;
}

async function loadAvatars() {
  const { avatars } = await apiJson(await fetch("/v1/avatars"));
  const box = $("avatars");
  box.replaceChildren();
  for (const a of avatars) {
    const b = document.createElement("button");
    b.type = "button";
    b.title = a.name;
    b.setAttribute("aria-pressed", String(a.id === avatar));
    const img = document.createElement("img"); // (properties, not markup: a name is text)
    img.alt = a.name;
    img.src = a.image;
    b.append(img);
    b.onclick = () => {
      avatar = a.id;
      for (const other of box.children) other.setAttribute("aria-pressed", String(other === b));
    };
    box.append(b);
  }
}

async function createSession() {
  const caption = $("caption").value.trim();
  const file = $("upload").files[0];
  let body, headers = {};
  if (params.get("token")) headers.Authorization = `Bearer ${params.get("token")}`;
  if (file) {
    body = new FormData();
    body.append("reference", file);
    if (caption) body.append("caption", caption);
  } else {
    body = JSON.stringify({ avatar, caption: caption || undefined });
    headers["Content-Type"] = "application/json";
  }
  return apiJson(await fetch("/v1/sessions", { method: "POST", body, headers }));
}

function deleteSession(s) {
  // keepalive: a DELETE sent as the page goes (pagehide) outlives it, as the Fetch spec promises
  // only such requests. One that fails is said on the console, not on the page: the peer
  // connection's closing ends the session on the server as well. (A 404 is a session the server
  // ended already.)
  fetch(s.resource, { method: "DELETE", headers: authHeaders(s), keepalive: true }).then((res) => {
    if (!res.ok && res.status !== 404) console.warn(`ending the session: DELETE ${res.status}`);
  }, (e) => console.warn("ending the session: DELETE failed:", e));
}

async function getMic() {
  if (!$("mic").checked || !navigator.mediaDevices) return null;
  try {
    return await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
  } catch (e) {
    console.warn("no microphone:", e);
    return null;
  }
}

// --- WebRTC (WHEP) ------------------------------------------------------------------------------
function trickleCandidates(peer, s) {
  // Trickle ICE (server/trickle.py): the offer goes at once, with the candidates gathered by
  // then, and each later one follows as a PATCH of the session resource, so no viewer waits for
  // gathering (a STUN or TURN server's answer can take a second) and none is left out.
  let offer = null, send = null, chain = Promise.resolve();
  const queued = [];
  peer.addEventListener("icecandidate", (e) => {
    if (offer === null) return;  // gathered before the offer was read: in it
    if (e.candidate && !e.candidate.candidate) return;  // an empty one: the end of a generation
    const lines = e.candidate ? [`a=mid:${e.candidate.sdpMid}`, `a=${e.candidate.candidate}`] : ["a=end-of-candidates"];
    send ? send(lines) : queued.push(lines);
  });
  return {
    posted(sdp) { offer = sdp; },
    answered(location, etag) {
      const head = [offer.match(/a=ice-ufrag:.*/)[0], offer.match(/a=ice-pwd:.*/)[0]];
      send = (lines) => {  // in order: the end of candidates comes last
        chain = chain.then(() => fetch(location, {
          method: "PATCH", body: head.concat(lines).join("\r\n") + "\r\n",
          headers: authHeaders(s, { "Content-Type": "application/trickle-ice-sdpfrag", "If-Match": etag }),
        })).then((res) => {
          if (res.ok && lines.length > 1) stats.trickled++;
          else if (!res.ok) console.warn(`trickle ICE: PATCH ${res.status}`);
        }, (err) => console.warn("trickle ICE:", err));
      };
      queued.splice(0).forEach(send);
    },
  };
}

async function connectWebRTC(mine) {
  // (its own peer and session, not the globals: hung up and connected again while it waited, an
  // attempt that went on would post its answer into the next connection's peer)
  const s = session;
  // STUN/TURN as the server was told (serve --ice-servers); none on a LAN or the same machine
  const peer = pc = new RTCPeerConnection({ iceServers: s.ice_servers || [] });
  const media = new MediaStream();
  peer.ontrack = (e) => {
    media.addTrack(e.track);
    $("video").srcObject = media;
  };
  peer.addTransceiver("video", { direction: "recvonly" });
  const audio = peer.addTransceiver("audio", { direction: "sendrecv" });
  audioSender = audio.sender;
  if (mic) await audio.sender.replaceTrack(mic.getAudioTracks()[0]);
  abandoned(mine);
  const trickle = trickleCandidates(peer, s);
  await peer.setLocalDescription(await peer.createOffer());
  abandoned(mine);
  offerPostedAt = performance.now();
  const offer = peer.localDescription.sdp;
  trickle.posted(offer);
  const res = await fetch(s.whep, {
    method: "POST", body: offer, headers: authHeaders(s, { "Content-Type": "application/sdp" }),
  });
  abandoned(mine);
  if (res.status !== 201) throw new Error(`WHEP ${res.status}: ${await res.text()}`);
  trickle.answered(s.resource, res.headers.get("ETag"));
  await peer.setRemoteDescription({ type: "answer", sdp: await res.text() });
  abandoned(mine);
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("WebRTC did not connect within 5 s")), 5000);
    peer.onconnectionstatechange = () => {
      if (peer.connectionState === "connected") { clearTimeout(timer); resolve(); }
      if (peer.connectionState === "failed") { clearTimeout(timer); reject(new Error("WebRTC failed")); }
    };
  });
  abandoned(mine);
  // from here on the connection ending is the session ending: the server closed it (a limit, a
  // DELETE from elsewhere, shutdown) or the network went; the page says so and frees what it holds
  peer.onconnectionstatechange = () => {
    if (mine !== generation) return;
    const state = peer.connectionState;
    clearTimeout(lostTimer);
    if (state === "failed" || state === "closed") ended("the connection was lost");
    else if (state === "disconnected") {  // ICE may still recover it
      lostTimer = setTimeout(() => { if (mine === generation) ended("the connection was lost"); }, 5000);
    }
  };
  stats.transport = "webrtc";
  $("video").hidden = false;
  $("canvas").hidden = true;
  const video = $("video");
  if (video.requestVideoFrameCallback) {
    video.requestVideoFrameCallback(() => {
      stats.firstFrameMs ??= performance.now() - offerPostedAt;
    });
  }
  video.muted = false;  // the avatar's voice; autoplay policies may keep it muted until a click
  video.play().catch(() => {
    if (mine !== generation) return;
    video.muted = true;
    video.play().catch(() => {});
    waitForClickForSound();
  });
  let ticks = 0;
  statsTimer = setInterval(() => {
    readRtcStats(peer, mine);
    // a session the server ended while the peer connection lingers (ICE takes its time to fail)
    if (++ticks % 4 === 0) checkSessionAlive(mine);
  }, 500);
}

async function checkSessionAlive(mine) {
  if (!session) return;
  try {
    const res = await fetch(session.resource, { headers: authHeaders(session) });
    if (res.status === 404 && mine === generation) ended("the server ended the session");
  } catch (e) {
    console.warn("session check:", e);
  }
}

function ended(reason) {
  cleanup(false);
  setStatus(`ended: ${reason}`);
}

async function readRtcStats(peer, mine) {
  const report = await peer.getStats();
  // hung up while it read (and maybe connected again): the figures are another connection's
  if (mine !== generation) return;
  let video = null, audio = null, pair = null;
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") video = s;
    if (s.type === "inbound-rtp" && s.kind === "audio") audio = s;
    if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s;
  });
  if (video) {
    stats.framesDecoded = video.framesDecoded || 0;
    stats.fps = video.framesPerSecond || 0;
    if (stats.framesDecoded > 0 && stats.firstFrameMs === null) stats.firstFrameMs = performance.now() - offerPostedAt;
  }
  if (video && audio) {
    if (video.estimatedPlayoutTimestamp && audio.estimatedPlayoutTimestamp) {
      // NTP time of what each track is playing now: equal when lips and sound line up
      stats.avOffsetMs = video.estimatedPlayoutTimestamp - audio.estimatedPlayoutTimestamp;
      stats.avMethod = "estimatedPlayoutTimestamp";
    } else if (video.jitterBufferEmittedCount && audio.jitterBufferEmittedCount) {
      stats.avOffsetMs = 1000 * (video.jitterBufferDelay / video.jitterBufferEmittedCount
        - audio.jitterBufferDelay / audio.jitterBufferEmittedCount);
      stats.avMethod = "jitterBufferDelay";
    }
  }
  if (pair && pair.currentRoundTripTime !== undefined) stats.rttMs = 1000 * pair.currentRoundTripTime;
  showOverlay();
}

// --- WebSocket fallback -------------------------------------------------------------------------
let audioCtx = null, playStart = null, playClockRuns = null, seqOut = 0, micPath = null, frameTimes = [];
const queuedFrames = new Set();   // timers that draw frames at their play time
const queuedSounds = new Set();   // audio buffers scheduled on audioCtx

function packAudio(pcm16) {
  const buf = new ArrayBuffer(HEADER_BYTES + pcm16.byteLength);
  const view = new DataView(buf);
  view.setUint8(0, 1);  // audio in
  view.setUint32(4, seqOut++, true);
  view.setBigInt64(8, 0n, true);
  new Int16Array(buf, HEADER_BYTES).set(pcm16);
  return buf;
}

async function connectWebSocket(mine) {
  // a session is bound to the transport that first used it: start a fresh one
  const made = await createSession();
  if (mine !== generation) {  // hung up meanwhile: this session is nobody's
    deleteSession(made);
    return;
  }
  session = made;
  // at the device's rate: Firefox connects a microphone to no other (the page resamples it,
  // web/resample.js; the avatar's 16 kHz voice plays from 16 kHz buffers, which any context takes)
  const context = audioCtx = new AudioContext();
  // a context made without a user's click (?autostart=1) may start suspended: the page asks for
  // one, and times the frames on its own clock meanwhile (playClock)
  audioCtx.resume().catch(() => {});
  setTimeout(() => {
    if (mine === generation && audioCtx === context && context.state === "suspended") waitForClickForSound();
  }, 1000);
  const url = new URL(`${session.stream}?token=${encodeURIComponent(session.token)}`, location.href);
  url.protocol = url.protocol.replace("http", "ws");
  const socket = ws = new WebSocket(url);
  seqOut = 0;  // numbered per connection (docs/api.md)
  ws.binaryType = "arraybuffer";
  const canvas = $("canvas");
  const ctx2d = canvas.getContext("2d");
  $("video").hidden = true;
  canvas.hidden = false;
  const openedAt = performance.now();
  // Listeners, not on* handlers: a hang-up clears those as it closes the socket, and the attempt
  // waited for good. A socket closed before the stream started (refused, or hung up while it
  // connected, when a slow server had not answered) ends the wait, as the time limit does.
  let limitTimer = null, readyCame = null;
  const ready = new Promise((resolve) => { readyCame = resolve; });
  const failed = new Promise((_, reject) => {
    // (a server's refusal is a close with its code and reason: 4404 unknown session, 4409, ...)
    socket.addEventListener("close", (e) => {
      const error = new Error(e.reason ? `WebSocket closed: ${e.code} ${e.reason}` : "WebSocket failed");
      error.sessionGone = sessionGoneWith(e.code);
      reject(error);
    });
    limitTimer = setTimeout(() => reject(new Error(
      `the WebSocket stream did not start within ${WEBSOCKET_START_MS / 1000} s: the server does not answer`,
    )), WEBSOCKET_START_MS);
  });
  try {
    await Promise.race([new Promise((resolve) => socket.addEventListener("open", resolve)), failed]);
    abandoned(mine);
    socket.send(JSON.stringify({ type: "start", format: "jpeg", flow: "latest" }));
    socket.addEventListener("message", (e) => {
      if (typeof e.data !== "string") return;
      const msg = JSON.parse(e.data);
      if (msg.type !== "ready" || socket !== ws) return;
      canvas.width = msg.width;
      canvas.height = msg.height;
      wsStarted = true;
      readyCame();
    });
    await Promise.race([ready, failed]);
  } finally {
    clearTimeout(limitTimer);
  }
  abandoned(mine);
  stats.transport = "websocket";
  socket.onmessage = async (e) => {
    if (socket !== ws) return;
    if (typeof e.data === "string") {
      const msg = JSON.parse(e.data);
      if (msg.type === "error") setStatus(`error: ${msg.message}`);
      return;
    }
    const view = new DataView(e.data);
    const kind = view.getUint8(0);
    const pts = Number(view.getBigInt64(8, true)) / 1e6;
    const runs = audioCtx.state === "running", now = playClock();
    if (runs !== playClockRuns) playStart = null;  // another clock: the stream anchored on it anew
    playClockRuns = runs;
    playStart ??= now + 0.15 - pts;  // a small playout buffer
    const at = playStart + pts;
    if (kind === 4 && runs) {  // audio out: schedule it on the audio clock (none while it stands still)
      const pcm = new Int16Array(e.data, HEADER_BYTES);
      const buffer = audioCtx.createBuffer(1, pcm.length, SAMPLE_RATE);
      const ch = buffer.getChannelData(0);
      for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
      const src = audioCtx.createBufferSource();
      src.buffer = buffer;
      src.connect(audioCtx.destination);
      src.onended = () => queuedSounds.delete(src);
      queuedSounds.add(src);
      src.start(Math.max(at, audioCtx.currentTime));
    } else if (kind === 2) {  // JPEG frame: draw it when its audio plays
      const bitmap = await createImageBitmap(new Blob([new Uint8Array(e.data, HEADER_BYTES)], { type: "image/jpeg" }));
      if (socket !== ws) return;  // hung up while it decoded
      const timer = setTimeout(() => {
        queuedFrames.delete(timer);
        ctx2d.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
        stats.framesDecoded++;
        stats.firstFrameMs ??= performance.now() - openedAt;
        const now = performance.now();
        frameTimes.push(now);
        while (frameTimes.length && frameTimes[0] < now - 2000) frameTimes.shift();
        stats.fps = frameTimes.length / 2;
        stats.avOffsetMs = 0;  // both scheduled on the same clock
      }, Math.max(0, (at - ((audioCtx.state === "running") === runs ? playClock() : now)) * 1000));
      queuedFrames.add(timer);
    }
  };
  socket.onclose = (e) => {
    if (socket !== ws) return;  // an earlier connection's socket: this one is not its to end
    cleanup(false);
    setStatus(`closed: ${e.code} ${e.reason}`);
  };
  statsTimer = setInterval(() => {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "ping", id: Date.now() }));
    showOverlay();
  }, 1000);
  // (not awaited: the stream needs no microphone, and one that cannot be connected is said on the
  // console; the worklet's module loads meanwhile)
  if (mic) startWsMic().catch((e) => console.warn("microphone:", e));
}

// The clock the WebSocket stream plays on: the AudioContext's, and the page's own while the
// context is suspended (autostarted without a click): its clock stands still then, and frames
// timed on it came later and later (9 s behind after 9 s), for good once it ran.
function playClock() {
  return audioCtx.state === "running" ? audioCtx.currentTime : performance.now() / 1000;
}

// The microphone to the WebSocket API, as 16 kHz PCM. Through an AudioWorklet (web/mic-worklet.js),
// which resamples on the audio thread; where the context has no audioWorklet, through a
// ScriptProcessorNode (deprecated, and run on the main thread) doing the same: AudioWorklet needs
// a secure context, and a page served over plain http from a LAN address (http://192.168.1.20:8000)
// is none (localhost is). micPath: {source, node} of the microphone being sent.
async function startWsMic() {
  const context = audioCtx;
  const path = micPath = { source: context.createMediaStreamSource(mic), node: null };
  const send = (pcm) => {
    // (a block posted before a hang-up or an unticking can arrive after it, even in a new connection)
    if (micPath !== path || !ws || ws.readyState !== WebSocket.OPEN || !$("mic").checked || !pcm.length) return;
    ws.send(packAudio(pcm));
  };
  let loaded = false;
  if (context.audioWorklet) {
    try {
      await context.audioWorklet.addModule(new URL("mic-worklet.js", import.meta.url));
      loaded = true;
    } catch (e) {
      if (micPath === path) console.warn("microphone: no AudioWorklet, using a ScriptProcessorNode:", e);
    }
    if (micPath !== path) return;  // hung up, or the box unticked, while it loaded
  }
  if (loaded) {
    // (one channel: a stereo microphone mixed down, as the ScriptProcessorNode's one input channel does)
    path.node = new AudioWorkletNode(context, "microphone-to-16k", {
      channelCount: 1, channelCountMode: "explicit", processorOptions: { rate: SAMPLE_RATE },
    });
    path.node.port.onmessage = (e) => send(e.data);
  } else {
    const to16k = new Resampler(context.sampleRate, SAMPLE_RATE);  // the device's rate -> the API's
    path.node = context.createScriptProcessor(1024, 1, 1);
    path.node.onaudioprocess = (e) => send(toPcm16(to16k.push(e.inputBuffer.getChannelData(0))));
  }
  path.source.connect(path.node);
  path.node.connect(context.destination);  // (silent) a node the destination does not reach may not run
}

function stopWsMic() {
  if (!micPath) return;
  const { source, node } = micPath;
  micPath = null;
  source.disconnect();
  if (node) {
    node.disconnect();
    if (node.port) {  // the worklet's processor ends, and its messages go nowhere
      node.port.postMessage("stop");
      node.port.onmessage = null;
    } else {
      node.onaudioprocess = null;
    }
  }
}

// Whether the server that closed a socket with this code has no session left for a DELETE to end: a
// socket holding its session ends it as it closes (4410, 4400, ...), and 4404 has none; a DELETE sent
// after either found nothing (a 404 the browser logs as an error). Only a session the server refused
// to hand the socket (its token: 4401, 4403; another transport's: 4409) lives on: the page DELETEs it.
function sessionGoneWith(code) {
  return code >= 4000 && code < 5000 && !sessionLivesOn(code);
}
function sessionLivesOn(code) {
  return [4401, 4403, 4409].includes(code);
}

// --- controls -------------------------------------------------------------------------------------
async function connect() {
  const mine = ++generation;
  $("connect").disabled = true;
  $("hangup").disabled = false;  // while connecting too: an attempt a server does not answer is given up
  resetStats();
  setStatus("connecting");
  try {
    const stream = await getMic();
    if (mine !== generation) {  // another connect (or a hang-up) came while the browser asked
      if (stream) stream.getTracks().forEach((t) => t.stop());
      return;
    }
    mic = stream;
    if (params.get("transport") === "ws") {
      await connectWebSocket(mine);
    } else {
      const made = await createSession();  // refused (full, bad image): the server's word, no fallback
      if (mine !== generation) {  // hung up meanwhile: this session is nobody's
        deleteSession(made);
        return;
      }
      session = made;
      try {
        await connectWebRTC(mine);
      } catch (e) {
        if (mine !== generation) return;
        console.warn("WebRTC unavailable, using the WebSocket API:", e);
        closePeer();
        await connectWebSocket(mine);
      }
    }
  } catch (e) {
    if (mine !== generation) return;
    stats.error = String(e);
    cleanup(!e.sessionGone);  // the microphone, and a session made on the way (unless it is gone)
    setStatus(`failed: ${e.message}`);
    return;
  }
  if (mine !== generation) return;
  setStatus(`streaming (${stats.transport})`);
  $("speak").disabled = false;
}

function hangUp() {
  // A WebSocket open whose stream has not started: its server has the start message (and ends the
  // session as the socket closes), or is slow, or is not the API at all. A DELETE at once raced the
  // socket: it ended the session first, or came after the socket had (a 404 the browser logs as an
  // error). It waits for the socket's close now, and goes only where no server answered it, or where
  // the answer was a refusal that leaves the session living (deleteUnlessTheSocketEndsIt).
  const socket = ws, s = session;
  const socketMayEndSession = socket !== null && socket.readyState === WebSocket.OPEN && !wsStarted;
  cleanup(!socketMayEndSession);
  if (socketMayEndSession && s) deleteUnlessTheSocketEndsIt(socket, s);
  setStatus("idle");
}

function deleteUnlessTheSocketEndsIt(socket, s) {
  // A clean close is a server's answer to the page's: the API's ends the session as its socket closes
  // (the stop message's "stopped", or mostly its WebSocket layer's echo of the page's close frame,
  // 1005), or says why the socket never held it: a session it does not know (4404: a DELETE would
  // not end it either), or one it refused to hand the socket (4401, 4403, 4409), which lives on and
  // is DELETEd. None in time (a silent server), or a connection cut: the session is DELETEd.
  let decided = false;
  const decide = (answered) => {
    if (decided) return;
    decided = true;
    clearTimeout(timer);
    if (!answered) deleteSession(s);
  };
  const timer = setTimeout(() => decide(false), SOCKET_CLOSE_ANSWER_MS);
  socket.addEventListener("close", (e) => decide(e.wasClean && !sessionLivesOn(e.code)));
}

function closePeer() {
  // a failed WebRTC attempt: its peer connection and its session (bound to WHEP once offered)
  if (pc) { pc.onconnectionstatechange = null; pc.close(); }
  if (session) deleteSession(session);
  pc = audioSender = session = null;
}

function cleanup(sendDelete = true) {
  generation++;
  clearInterval(statsTimer);
  clearTimeout(lostTimer);
  // A WebSocket whose stream started ends its session itself, with the stop message below (and,
  // were that lost, by closing): a DELETE after the stop found the session ended, a 404 the browser
  // logs as an error. A socket not started may never have reached the server: the session is DELETEd.
  const socketEndsSession = ws !== null && ws.readyState === WebSocket.OPEN && wsStarted;
  if (sendDelete && session && !socketEndsSession) deleteSession(session);
  if (pc) { pc.onconnectionstatechange = null; pc.close(); }
  if (ws) {
    ws.onclose = ws.onmessage = ws.onerror = null;
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "stop" }));
    ws.close();
  }
  stopWsMic();
  if (mic) mic.getTracks().forEach((t) => t.stop());
  queuedFrames.forEach(clearTimeout);
  queuedFrames.clear();
  queuedSounds.forEach((src) => { try { src.stop(); } catch { /* not started */ } });
  queuedSounds.clear();
  if (audioCtx) audioCtx.close().catch(() => {});
  // no last frame left on the stage, looking live: a <video> keeps showing its ended stream's
  clearStage();
  pc = ws = mic = audioSender = audioCtx = session = null;
  wsStarted = false;
  playStart = playClockRuns = null;
  soundWaits = false;
  $("sound").hidden = true;
  $("connect").disabled = false;
  $("hangup").disabled = true;
  $("speak").disabled = true;
}

function clearStage() {
  const video = $("video"), canvas = $("canvas");
  video.srcObject = null;
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

async function speak(e) {
  e.preventDefault();
  const text = $("speak-text").value.trim();
  if (!text || !session) return;
  const msg = { type: "speak", text };
  if (ws) {
    ws.send(JSON.stringify(msg));
  } else {
    try {  // (a refusal, or no answer at all, was an unhandled rejection: the page said nothing)
      const res = await fetch(`${session.resource}/control`, {
        method: "POST", body: JSON.stringify(msg), headers: authHeaders(session, { "Content-Type": "application/json" }),
      });
      if (!res.ok) await apiJson(res);
    } catch (err) {
      setStatus(`speak: ${err.message}`);
      return;  // the text stays, to be sent again
    }
  }
  $("speak-text").value = "";
}

$("connect").onclick = connect;
$("hangup").onclick = hangUp;
$("speak-form").onsubmit = speak;
$("mic").onchange = async () => {
  // only while connected: the microphone is taken for a connection and given back with it
  const mine = generation, on = $("mic").checked;
  if (!(pc && audioSender) && !(ws && audioCtx)) return;
  if (on && !mic) {
    const stream = await getMic();
    if (mine !== generation) {  // hung up while the browser asked
      if (stream) stream.getTracks().forEach((t) => t.stop());
      return;
    }
    mic = stream;
  }
  if (pc && audioSender) await audioSender.replaceTrack(on && mic ? mic.getAudioTracks()[0] : null);
  else if (ws && mic && !micPath) startWsMic().catch((e) => console.warn("microphone:", e));
  if (!on && mic) {  // given back, not only muted: the browser's recording indicator goes off
    stopWsMic();
    mic.getTracks().forEach((t) => t.stop());
    mic = null;
  }
};
window.addEventListener("pagehide", () => cleanup(true));
if (params.get("mic") === "0") $("mic").checked = false;
showOverlay();
loadAvatars().catch((e) => {  // the default avatar is still there: said in the list's place
  console.warn("avatars:", e);
  $("avatars").textContent = `no avatars to choose from (${e.message})`;
}).then(() => {  // (not when a click was quicker)
  if (params.get("autostart") === "1" && !$("connect").disabled) connect();
});
