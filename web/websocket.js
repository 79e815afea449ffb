// The WebSocket API, the fallback: its session and stream, the playout of its frames and sound on
// the audio clock, the microphone sent over it, and what its close codes say about the session.
import { createSession, deleteSession } from "./api.js";
import {
  $, abandoned, params, setNotice, showOverlay, SPEAK_ANSWER_MS, speakTaken, speakUnanswered, state, stats,
  waitForClickForSound,
} from "./page.js";
import { Resampler, toPcm16 } from "./resample.js";

const SAMPLE_RATE = 16000;
const HEADER_BYTES = 16;
// How long a WebSocket connect may take, from the socket's creation to the server's "ready" (its
// answer to the start message; the server sends it at once). The browser sets no limit of its own:
// a server or proxy that took the TCP connection and then said nothing left the page "connecting"
// (or "streaming" with nothing coming) for good. Generous: a real server answers within a second.
const WEBSOCKET_START_MS = 10000;
const WEBSOCKET_UNREACHED = "the WebSocket stream could not connect to the server (it is gone, or a proxy between "
  + "does not pass WebSockets on)";
// How many times a WebSocket closed before it opened is tried, and how far apart. A server at its
// --max-connections answers the upgrade 503 with Retry-After: 1 (docs/api.md), which a browser does
// not show a page: the socket closes as one that never reached the server (1006). The page said it
// could not connect, and its session, made over a connection the browser had already, was left to
// the server's unclaimed limit. It is tried again a second apart (the server's Retry-After), within
// the connect's time limit; a server truly gone or a proxy that takes no WebSocket fails them as fast.
const WEBSOCKET_TRIES = 5;
const WEBSOCKET_RETRY_MS = 1000;
// How long a hang-up waits for the server to answer its WebSocket's close before it DELETEs the
// session (deleteUnlessTheSocketEndsIt). A real server answers at once.
const SOCKET_CLOSE_ANSWER_MS = 2000;
// How long a streaming WebSocket may hear nothing from its server (frames come 25 a second, and the
// answer to the page's ping each second) before the page gives it up. A network that went away (a
// laptop's Wi-Fi dropped, a NAT that forgot the connection) closes no socket: the page said
// 'streaming' on its last frame for as long as TCP took to give up, minutes. The page's `?silent_s=`
// sets it in seconds (a network known to pause longer, or a test), at least 2: the pong comes each
// second.
export function silentLimitMs(asked) {
  // (absent, empty or no number: 10 s; any number below 2, 0 included, is 2: `Number("0") || 10` gave 10)
  const seconds = asked === null || asked.trim() === "" ? NaN : Number(asked);
  return Math.max(2, Number.isFinite(seconds) ? seconds : 10) * 1000;
}
const WEBSOCKET_SILENT_MS = silentLimitMs(params.get("silent_s"));

let playStart = null, playClockRuns = null, seqOut = 0, micPath = null, frameTimes = [];
// Each speak sent and not answered yet, by its id: {typed (the field's text), timer (its answer's
// limit), givenUp}. The server answers each with "speaking" or an error, with its id: matched by
// order, a speak given up (no answer in time) and answered later took the next one's answer.
const speaksSent = new Map();
let lastSpeakId = 0;
// timers that draw frames at their play time, each with its decoded frame: an ImageBitmap holds its
// pixels until closed (25 a second left to the garbage collector), closed once drawn or dropped
const queuedFrames = new Map();
const queuedSounds = new Set();   // audio buffers scheduled on state.audioCtx

export function forgetFrameTimes() {
  frameTimes = [];
}

function packAudio(pcm16) {
  const buf = new ArrayBuffer(HEADER_BYTES + pcm16.byteLength);
  const view = new DataView(buf);
  view.setUint8(0, 1);  // audio in
  view.setUint32(4, seqOut++, true);
  view.setBigInt64(8, 0n, true);
  new Int16Array(buf, HEADER_BYTES).set(pcm16);
  return buf;
}

// closed(event): the socket closed by itself, the stream going (the page is given back, and says why)
export async function connectWebSocket(mine, closed) {
  // a session is bound to the transport that first used it: start a fresh one
  const made = await createSession();
  if (mine !== state.generation) {  // hung up meanwhile: this session is nobody's
    deleteSession(made);
    return;
  }
  state.session = made;
  // at the device's rate: Firefox connects a microphone to no other (the page resamples it,
  // web/resample.js; the avatar's 16 kHz voice plays from 16 kHz buffers, which any context takes)
  const context = state.audioCtx = new AudioContext();
  // a context made without a user's click (?autostart=1) may start suspended: the page asks for
  // one, and times the frames on its own clock meanwhile (playClock)
  state.audioCtx.resume().catch(() => {});
  setTimeout(() => {
    const suspended = context.state === "suspended";
    if (mine === state.generation && state.audioCtx === context && suspended) waitForClickForSound();
  }, 1000);
  const url = new URL(`${state.session.stream}?token=${encodeURIComponent(state.session.token)}`, location.href);
  url.protocol = url.protocol.replace("http", "ws");
  const canvas = $("canvas");
  const ctx2d = canvas.getContext("2d");
  $("video").hidden = true;
  canvas.hidden = false;
  const openedAt = performance.now();
  // Listeners, not on* handlers: a hang-up clears those as it closes the socket, and the attempt
  // waited for good. A socket closed before the stream started (refused, or hung up while it
  // connected, when a slow server had not answered) ends the wait, as the time limit does.
  let limitTimer = null, readyCame = null, socket = null, failed = null;
  const ready = new Promise((resolve) => { readyCame = resolve; });
  const outOfTime = new Promise((_, reject) => {
    limitTimer = setTimeout(() => reject(new Error(
      `the WebSocket stream did not start within ${WEBSOCKET_START_MS / 1000} s: the server does not answer`,
    )), WEBSOCKET_START_MS);
  });
  try {
    for (let tries = 1; ; tries++) {
      socket = state.ws = new WebSocket(url);
      seqOut = 0;  // numbered per connection (docs/api.md)
      socket.binaryType = "arraybuffer";
      failed = Promise.race([closedBeforeItsStream(socket), outOfTime]);
      try {
        await Promise.race([new Promise((resolve) => socket.addEventListener("open", resolve)), failed]);
        break;
      } catch (e) {
        abandoned(mine);  // (a hang-up's close of a socket connecting is a 1006 too: not tried again)
        if (!e.unreached || tries >= WEBSOCKET_TRIES) throw e;
      }
      await Promise.race([new Promise((resolve) => setTimeout(resolve, WEBSOCKET_RETRY_MS)), outOfTime]);
      abandoned(mine);  // (hung up while it waited: no socket more)
    }
    abandoned(mine);
    socket.send(JSON.stringify({ type: "start", format: "jpeg", flow: "latest" }));
    const readyHeard = (e) => {
      const msg = typeof e.data === "string" ? serverMessage(e.data) : null;
      if (msg?.type !== "ready" || socket !== state.ws) return;
      socket.removeEventListener("message", readyHeard);  // (the stream's handler reads the rest)
      canvas.width = msg.width;
      canvas.height = msg.height;
      state.wsStarted = true;
      readyCame();
    };
    socket.addEventListener("message", readyHeard);
    await Promise.race([ready, failed]);
  } finally {
    clearTimeout(limitTimer);
  }
  abandoned(mine);
  stats.transport = "websocket";
  let heardAt = performance.now(), tickedAt = heardAt, pingedAt = 0;
  // A ping each second keeps a session without a microphone (the idle limit counts the client's
  // messages). From the timer alone, it stopped in a tab hidden for long, whose timers run once a
  // minute: the session was closed as idle while it was watched. The stream's messages send it too.
  const ping = (now) => {
    if (now - pingedAt < 1000 || socket.readyState !== WebSocket.OPEN) return;
    pingedAt = now;
    socket.send(JSON.stringify({ type: "ping", id: Date.now() }));
  };
  socket.onmessage = async (e) => {
    if (socket !== state.ws) return;
    heardAt = performance.now();
    ping(heardAt);
    if (typeof e.data === "string") {
      const msg = serverMessage(e.data);
      if (!msg) return;
      const speakRefused = msg.type === "error" && msg.for === "speak";
      // (a speak refused is said as a WebRTC page says it, whose speak goes over HTTP)
      if (msg.type === "error") setNotice(`${speakRefused ? "speak" : "error"}: ${msg.message}`);
      const id = msg.id ?? speaksSent.keys().next().value;  // (a server that drops ids: the oldest)
      const sent = (msg.type === "speaking" || speakRefused) && speaksSent.get(id);
      if (sent) {
        clearTimeout(sent.timer);
        speaksSent.delete(id);
        // (one given up, answered late: Speak waits still for a speak sent since)
        $("speak").disabled = [...speaksSent.values()].some((s) => !s.givenUp);
        if (msg.type === "speaking") speakTaken(sent.typed);  // (refused: the text stays, to be sent again)
      }
      return;
    }
    const view = new DataView(e.data);
    const kind = view.getUint8(0);
    const pts = Number(view.getBigInt64(8, true)) / 1e6;
    const runs = state.audioCtx.state === "running", now = playClock();
    if (runs !== playClockRuns) playStart = null;  // another clock: the stream anchored on it anew
    playClockRuns = runs;
    playStart ??= now + 0.15 - pts;  // a small playout buffer
    const at = playStart + pts;
    if (kind === 4 && runs) {  // audio out: schedule it on the audio clock (none while it stands still)
      const pcm = new Int16Array(e.data, HEADER_BYTES);
      const buffer = state.audioCtx.createBuffer(1, pcm.length, SAMPLE_RATE);
      const ch = buffer.getChannelData(0);
      for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
      const src = state.audioCtx.createBufferSource();
      src.buffer = buffer;
      src.connect(state.audioCtx.destination);
      src.onended = () => queuedSounds.delete(src);
      queuedSounds.add(src);
      src.start(Math.max(at, state.audioCtx.currentTime));
    } else if (kind === 2) {  // JPEG frame: draw it when its audio plays
      const bitmap = await createImageBitmap(new Blob([new Uint8Array(e.data, HEADER_BYTES)], { type: "image/jpeg" }));
      if (socket !== state.ws) {  // hung up while it decoded
        bitmap.close();
        return;
      }
      const timer = setTimeout(() => {
        queuedFrames.delete(timer);
        ctx2d.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
        bitmap.close();
        stats.framesDecoded++;
        stats.firstFrameMs ??= performance.now() - openedAt;
        const now = performance.now();
        frameTimes.push(now);
        while (frameTimes.length && frameTimes[0] < now - 2000) frameTimes.shift();
        stats.fps = frameTimes.length / 2;
        stats.avOffsetMs = 0;  // both scheduled on the same clock
      }, Math.max(0, (at - ((state.audioCtx.state === "running") === runs ? playClock() : now)) * 1000));
      queuedFrames.set(timer, bitmap);
    }
  };
  socket.onclose = (e) => {
    if (socket !== state.ws) return;  // an earlier connection's socket: this one is not its to end
    closed(e);
  };
  state.statsTimer = setInterval(() => {
    const now = performance.now();
    // a page that did not run (its tab hidden for long: its timers slowed to one a minute) heard
    // nothing because it did not listen: it counts again
    if (now - tickedAt > 3000) heardAt = now;
    tickedAt = now;
    if (now - heardAt > WEBSOCKET_SILENT_MS && socket === state.ws) {
      closed({ code: 1006, reason: `the server sent nothing for ${WEBSOCKET_SILENT_MS / 1000} s` });
      return;
    }
    ping(now);
    showOverlay();
  }, 1000);
  // (not awaited: the stream needs no microphone, and one that cannot be connected is said on the
  // console; the worklet's module loads meanwhile. One the box's change started while the socket
  // waited for its ready runs already: a second one left the first connected, its worklet running.)
  if (state.mic && !wsMicRunning()) startWsMic().catch((e) => console.warn("microphone:", e));
}

// A text message of the server's: its JSON object, or null for one the page cannot read (not JSON, a
// proxy's or a broken server's), said on the console and ignored. It threw in the message's handler:
// an uncaught error on the console, the message lost all the same.
function serverMessage(text) {
  try {
    const msg = JSON.parse(text);
    if (msg !== null && typeof msg === "object") return msg;
  } catch { /* said below */ }
  console.warn(`the server sent a message the page cannot read, ignored: ${text.slice(0, 200)}`);
  return null;
}

// A promise the socket's close rejects, with what the page says of it: a server's refusal is a close
// with its code and reason (4404 unknown session, 4409, ...). One without a close frame (1006) never
// reached the API's socket (`unreached`): the page said "failed: WebSocket failed".
function closedBeforeItsStream(socket) {
  return new Promise((_, reject) => {
    socket.addEventListener("close", (e) => {
      const said = e.code === 1006 ? WEBSOCKET_UNREACHED : `WebSocket closed: ${e.code} ${e.reason}`.trimEnd();
      reject(Object.assign(new Error(said), { sessionGone: sessionGoneWith(e.code), unreached: e.code === 1006 }));
    });
  });
}

// The clock the WebSocket stream plays on: the AudioContext's, and the page's own while the
// context is suspended (autostarted without a click): its clock stands still then, and frames
// timed on it came later and later (9 s behind after 9 s), for good once it ran.
function playClock() {
  return state.audioCtx.state === "running" ? state.audioCtx.currentTime : performance.now() / 1000;
}

// The microphone to the WebSocket API, as 16 kHz PCM. Through an AudioWorklet (web/mic-worklet.js),
// which resamples on the audio thread; where the context has no audioWorklet, through a
// ScriptProcessorNode (deprecated, and run on the main thread) doing the same: AudioWorklet needs
// a secure context, and a page served over plain http from a LAN address (http://192.168.1.20:8000)
// is none (localhost is). micPath: {source, node} of the microphone being sent.
export async function startWsMic() {
  const context = state.audioCtx;
  const path = micPath = { source: context.createMediaStreamSource(state.mic), node: null };
  const send = (pcm) => {
    // (a block posted before a hang-up or an unticking can arrive after it, even in a new connection)
    const ws = state.ws;
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

export const wsMicRunning = () => micPath !== null;

export function stopWsMic() {
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

export function deleteUnlessTheSocketEndsIt(socket, s) {
  // A clean close is a server's answer to the page's: the API's ends the session as its socket closes
  // (the stop message's "stopped", or mostly its WebSocket layer's echo of the page's close frame,
  // 1005), or says why the socket never held it: a session it does not know (4404: a DELETE would
  // not end it either), or one it refused to hand the socket (4401, 4403, 4409), which lives on and
  // is DELETEd. None in time (a silent server), or a connection cut: the session is DELETEd.
  // The page left meanwhile (the tab closed): its timer went with it, and the DELETE never went (the
  // session held its place until the server's unclaimed limit, 20 s). It goes at pagehide, keepalive.
  let decided = false;
  const decide = (answered) => {
    if (decided) return;
    decided = true;
    clearTimeout(timer);
    window.removeEventListener("pagehide", pageLeft);
    if (!answered) deleteSession(s);
  };
  const pageLeft = () => decide(false);
  const timer = setTimeout(() => decide(false), SOCKET_CLOSE_ANSWER_MS);
  window.addEventListener("pagehide", pageLeft);
  socket.addEventListener("close", (e) => decide(e.wasClean && !sessionLivesOn(e.code)));
}

// A speak over the WebSocket, whose answer comes in band: given up after SPEAK_ANSWER_MS, as one over
// HTTP (app.js). Without a limit, a server that never answered left Speak disabled for good.
export function sendSpeak(msg, typed) {
  const id = ++lastSpeakId;
  state.ws.send(JSON.stringify({ ...msg, id }));
  const sent = { typed, givenUp: false, timer: null };
  sent.timer = setTimeout(() => {
    sent.givenUp = true;
    speakUnanswered();
  }, SPEAK_ANSWER_MS);
  speaksSent.set(id, sent);
}

// A hang-up's, or a connection's end: the socket (its stream told to stop, were it started), the
// microphone's path, the frames and sounds still to play, and the audio context.
export function closeWebSocket() {
  const ws = state.ws;
  if (ws) {
    ws.onclose = ws.onmessage = ws.onerror = null;
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "stop" }));
    ws.close();
  }
  stopWsMic();
  queuedFrames.forEach((bitmap, timer) => {
    clearTimeout(timer);
    bitmap.close();
  });
  queuedFrames.clear();
  queuedSounds.forEach((src) => { try { src.stop(); } catch { /* not started */ } });
  queuedSounds.clear();
  if (state.audioCtx) state.audioCtx.close().catch(() => {});
  state.ws = state.audioCtx = null;
  state.wsStarted = false;
  playStart = playClockRuns = null;
  speaksSent.forEach((sent) => clearTimeout(sent.timer));
  speaksSent.clear();
}
