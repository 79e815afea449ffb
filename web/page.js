// What every part of the page shares: its elements and query parameters, the figures the overlay
// shows, the page's state (what a connect makes and a hang-up gives back), its status line, the
// sound that waits for a click, and the microphone.

export const $ = (id) => document.getElementById(id);
export const params = new URLSearchParams(location.search);

// what the overlay shows; tests read it as window.streamgenStats
export const stats = { transport: null, firstFrameMs: null, framesDecoded: 0, fps: 0, avOffsetMs: null,
  rttMs: null, state: "idle", notice: "", error: null, trickled: 0 };
window.streamgenStats = stats;

// One object, not variables: the page's modules share it, and a module cannot assign another's.
export const state = {
  avatar: params.get("avatar") || "sample",
  avatars: null,      // the server's avatar ids, once its list came (a wrong ?avatar= is said at once)
  session: null,      // {id, token, resource, whep, stream, ice_servers}
  pc: null,           // RTCPeerConnection (WebRTC)
  ws: null,           // WebSocket (fallback)
  wsStarted: false,   // its server answered the start message ("ready"): it holds the session
  mic: null,          // MediaStream from getUserMedia
  audioSender: null,  // RTCRtpSender carrying the mic
  audioCtx: null,     // the WebSocket stream's AudioContext: its sound, and the microphone's way out
  statsTimer: null,
  lostTimer: null,    // a WebRTC connection "disconnected": ended unless it comes back
  peerRequests: null, // AbortController: the WebRTC connection's requests still going (its trickle)
  // Each connect and each hang-up starts a new generation: the late events of an older connection
  // (a socket's close, a peer's state change, a microphone granted after hanging up) do nothing.
  generation: 0,
};
// Thrown where a connect attempt finds it was hung up (or replaced) while it waited: the page,
// its peer connection and its session are another generation's now (connect says nothing).
export const abandoned = (mine) => {
  if (mine !== state.generation) throw new Error("hung up while connecting");
};

// The header's height, for the stage's (style.css): a long status or notice wraps it (on a phone held
// sideways the stage, sized for a header of one line, ran past the screen's lower edge).
const header = document.querySelector("header");
new ResizeObserver(() => {
  document.documentElement.style.setProperty("--header-height", `${header.getBoundingClientRect().height}px`);
}).observe(header);

export function setStatus(text) {
  stats.state = text;
  $("status").textContent = text;
}

// What the server said of one request while the stream goes on (a speak refused, a message it
// did not take): beside the status, not in its place. In its place, "error: ..." was left where
// "streaming" had been, for as long as the stream went on.
// An ?avatar= the server does not have: said by the page, in its own words (the server's were for
// programs: "see GET /v1/avatars"), before a connect and by one.
export const unknownAvatar = () => `no avatar "${state.avatar}" on this server (the address's ?avatar=): choose one`;

// Why the server ended a session, in a user's words: its reasons are for programs, a code and its
// details ("max_duration: session reached 3 s", "peer_silent: nothing from the peer for 10 s"),
// and were shown as they came. One not here is said as the server says it.
const SERVER_END_REASONS = [
  [/^max_duration: session reached (.+)$/, (limit) => `the session reached this server's time limit (${limit})`],
  [/^idle: no input for (.+)$/, (s) => `the server ended the session: it heard and read nothing from you for ${s}`],
  [/^peer_silent: nothing from the peer for (.+)$/,
    (s) => `the server ended the session: it received nothing from this page for ${s} (the connection stalled)`],
  [/^never_connected: /, () => "the connection could not be made (a firewall or the network may block it)"],
  [/^unclaimed: no client connected within (.+)$/,
    (s) => `the server ended the session: no connection came for it within ${s}`],
  [/^host_down: /, () => "the server's model stopped working: the server needs a restart"],
  [/^server shutting down/, () => "the server shut down"],
  [/^slow consumer/, () => "the server ended the session: this page did not keep up with the stream "
    + "(a slow network or device)"],
  [/^deleted by client/, () => "the session was ended elsewhere (deleted)"],
  [/^generation failed: /, () => "the server failed to make the video"],
];

export function serverEndedInWords(reason) {
  console.info(`the server ended the session: ${reason}`);  // (its own words, for whoever looks into it)
  for (const [said, words] of SERVER_END_REASONS) {
    const found = reason.match(said);
    if (found) return words(...found.slice(1));
  }
  return `the server ended the session (${reason})`;
}

export function setNotice(text) {
  stats.notice = text;
  $("notice").textContent = text;
}

// How long a speak may wait for its answer, which comes once its speech is made (espeak-ng: well under
// a second; the WebSocket API answers each within 15 s of its arrival). Without a limit, a server that
// never answered left Speak disabled until a hang-up. The server may have it still: it is not sent
// again, nor its text taken away.
export const SPEAK_ANSWER_MS = 20000;
export function speakUnanswered() {
  setNotice(`speak: no answer from the server in ${SPEAK_ANSWER_MS / 1000} s; it may still be said`);
  $("speak").disabled = false;
}

// A speak the server took: its text leaves the field, unless the field holds something else now.
// (Emptied whatever it held, a sentence typed while the last one was answered went with it; and
// emptied as the text was sent, a speak refused, over the WebSocket, lost its text.)
export function speakTaken(typed) {
  setNotice("");
  if ($("speak-text").value === typed) $("speak-text").value = "";
}

export function showOverlay() {
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
export function waitForClickForSound() {
  soundWaits = true;
  $("sound").hidden = false;
}
function soundOn() {
  // an event that gave the page no activation (Escape, a key the browser keeps for itself) gives it
  // no sound either: the note went and the sound stayed off (a WebRTC video paused besides)
  if (!soundWaits || navigator.userActivation?.isActive === false) return;
  soundWaits = false;
  $("sound").hidden = true;
  const video = $("video");
  if (state.pc && video.muted) { video.muted = false; video.play().catch(() => {}); }
  if (state.audioCtx && state.audioCtx.state === "suspended") state.audioCtx.resume().catch(() => {});
}
for (const type of ["click", "keydown", "touchend"]) document.addEventListener(type, soundOn, true);
// a hang-up's: no connection, no sound to wait for
export function soundNoLongerWaits() {
  soundWaits = false;
  $("sound").hidden = true;
}

// The microphone, where its box is ticked. One the browser does not give (denied, none plugged in,
// a page over plain http from another machine's address) is said beside the box, which is unticked:
// the stream goes on without it (it did so with the box ticked and the reason on the console only,
// the user talking to nobody), and ticking the box again asks again.
export async function getMic() {
  $("mic-note").textContent = "";
  if (!$("mic").checked) return null;
  if (!navigator.mediaDevices) return noMic("the browser gives a page the microphone only over HTTPS or on localhost");
  try {
    return await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
  } catch (e) {
    console.warn("no microphone:", e);
    return noMic(e.message || e.name);
  }
}
function noMic(why) {
  $("mic").checked = false;
  $("mic-note").textContent = `no microphone: ${why}`;
  return null;
}
