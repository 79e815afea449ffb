// streamgen browser client: WHEP (WebRTC) first, the WebSocket API as the fallback.
// Plain modern JS, no build step. Query parameters for automation:
//   ?autostart=1  connect on load      ?avatar=ada   preselect an avatar
//   ?mic=0        start without mic    ?transport=ws skip WebRTC
//   ?token=T      the server token, on a server started with --token
//   ?silent_s=10  seconds a WebSocket stream may hear nothing before the page gives it up (>= 2)
// The page's modules: page.js (what they share), api.js, webrtc.js, websocket.js; this one: the
// avatars, the controls, and a connection's start and end.
import {
  abandonCreations, answeredFetch, apiFetch, apiJson, authHeaders, createSession, deleteSession,
} from "./api.js";
import {
  $, getMic, params, serverEndedInWords, setNotice, setStatus, showOverlay, soundNoLongerWaits, SPEAK_ANSWER_MS, speakTaken,
  speakUnanswered, state, stats, unknownAvatar,
} from "./page.js";
import { closePeer, connectWebRTC } from "./webrtc.js";
import {
  closeWebSocket, connectWebSocket, deleteUnlessTheSocketEndsIt, forgetFrameTimes, sendSpeak, startWsMic,
  stopWsMic, wsMicRunning,
} from "./websocket.js";

function resetStats() {
  Object.assign(stats, { transport: null, firstFrameMs: null, framesDecoded: 0, fps: 0, avOffsetMs: null,
    rttMs: null, error: null, trickled: 0, avMethod: undefined });
  forgetFrameTimes();
  // (drawn only by a stream's stats timer: a connect that failed showed the last stream's figures)
  showOverlay();
}

async function loadAvatars() {
  // (limited: ?autostart=1 connects once the list came or failed, and waited for good on one not answered)
  const { avatars, captions } = await apiJson(await answeredFetch("/v1/avatars"));
  // a model that takes no captions refuses each session asked with one (422): not offered then
  if (captions === false) {
    $("caption").disabled = true;
    $("caption").value = "";
    $("caption-note").textContent = "(this server's model takes none)";
  }
  const box = $("avatars");
  box.replaceChildren();
  for (const a of avatars) {
    const b = document.createElement("button");
    b.type = "button";
    b.title = a.name;
    b.dataset.avatar = a.id;
    const img = document.createElement("img"); // (properties, not markup: a name is text)
    img.alt = a.name;
    img.src = a.image;
    b.append(img);
    b.onclick = () => {
      if (stats.notice === unknownAvatar()) setNotice("");  // (chosen now)
      state.avatar = a.id;
      $("upload").value = "";
      showChosenAvatar();
    };
    box.append(b);
  }
  state.avatars = new Set(avatars.map((a) => a.id));
  if (!state.avatars.has(state.avatar) && !$("upload").files.length) setNotice(unknownAvatar());
  showChosenAvatar();
}

// The face a connect streams: the picture chosen last, the avatar button clicked or the upload. A
// picture chosen went instead of an avatar clicked after it, whose button said it was the one.
function showChosenAvatar() {
  const uploaded = $("upload").files.length > 0;
  for (const b of $("avatars").children) {
    b.setAttribute("aria-pressed", String(!uploaded && b.dataset.avatar === state.avatar));
  }
}

// A connection that ended by itself (the transports call these): the page is given back, and says why.
function ended(reason) {
  cleanup(false);
  setStatus(`ended: ${reason}`);
}

// A socket the server closed as the session's end (a limit, its shutdown, a client too slow to
// read) is said as a WebRTC page says it ("closed: 4410 max_duration: ..." read as a fault); a
// protocol error or a lost connection keeps its code, for whoever looks into it.
const SERVER_ENDED = new Set([1001, 4408, 4410, 4430]);

function closed(e) {
  cleanup(false);
  if (SERVER_ENDED.has(e.code) && e.reason) setStatus(`ended: ${serverEndedInWords(e.reason)}`);
  else setStatus(`closed: ${e.code} ${e.reason || "the connection was lost"}`);  // (no reason: no close frame came)
}

// The microphone a connection holds. One that ends by itself (unplugged, its permission taken back)
// is said beside its box and given back as unticking the box gives it: the avatar heard nothing
// more, the box ticked and nothing said so. Ticking the box again takes the one there is now.
function holdMic(stream) {
  state.mic = stream;
  if (!stream) return;
  stream.getAudioTracks()[0].addEventListener("ended", () => {
    if (state.mic !== stream) return;  // given back already
    $("mic").checked = false;
    $("mic").dispatchEvent(new Event("change"));
    $("mic-note").textContent = "no microphone: it stopped (unplugged, or its permission taken back)";
  });
}

// How long the WebSocket fallback waits for the failed WebRTC attempt's session to be DELETEd
const FALLBACK_DELETE_MS = 2000;

// --- controls -------------------------------------------------------------------------------------
async function connect() {
  const mine = ++state.generation;
  const focused = document.activeElement === $("connect");
  $("connect").disabled = true;
  $("hangup").disabled = false;  // while connecting too: an attempt a server does not answer is given up
  // the face and caption are a session's from its start: chosen meanwhile, they changed nothing on
  // the stage, and the button pressed was no longer the face streamed
  $("face").disabled = true;
  // a button disabled under the keyboard's focus drops it (to the page's start): it goes to its
  // counterpart, as a hang-up's goes back to Connect
  if (focused) $("hangup").focus();
  resetStats();
  setNotice("");
  setStatus("connecting");
  try {
    let stream = await getMic();
    // the box unticked while the browser asked: not taken (it went to the avatar, the box unticked);
    // unticked and ticked again, the box's change took one of its own meanwhile: this one is not needed
    if (stream && (mine !== state.generation || !$("mic").checked || state.mic)) {
      stream.getTracks().forEach((t) => t.stop());
      stream = null;
    }
    if (mine !== state.generation) return;  // another connect (or a hang-up) came while the browser asked
    if (stream) holdMic(stream);
    if (params.get("transport") === "ws") {
      await connectWebSocket(mine, closed);
    } else {
      const made = await createSession();  // refused (full, bad image): the server's word, no fallback
      if (mine !== state.generation) {  // hung up meanwhile: this session is nobody's
        deleteSession(made);
        return;
      }
      state.session = made;
      try {
        await connectWebRTC(mine, ended);
      } catch (e) {
        if (mine !== state.generation) return;
        console.warn("WebRTC unavailable, using the WebSocket API:", e);
        // its session ended before the WebSocket's is asked for: on a server of one session the
        // DELETE raced the fallback's POST, which was refused (503: at capacity). (A DELETE not
        // answered is waited for 2 s at most: the fallback's own request says what became of it.)
        await Promise.race([closePeer(), new Promise((resolve) => setTimeout(resolve, FALLBACK_DELETE_MS))]);
        if (mine !== state.generation) return;
        // failed as well, it says why WebRTC did: the WebSocket's reason alone read as though that were
        // the only way tried (a network without UDP and a proxy without WebSockets needs both said)
        await connectWebSocket(mine, closed).catch((fallbackError) => {
          fallbackError.message += `; tried first: ${e.message}`;
          throw fallbackError;
        });
      }
    }
  } catch (e) {
    if (mine !== state.generation) return;
    stats.error = String(e);
    cleanup(!e.sessionGone);  // the microphone, and a session made on the way (unless it is gone)
    setStatus(`failed: ${e.message}`);
    return;
  }
  if (mine !== state.generation) return;
  setStatus(`streaming (${stats.transport})`);
  $("speak").disabled = false;
}

function hangUp() {
  // A WebSocket open whose stream has not started: its server has the start message (and ends the
  // session as the socket closes), or is slow, or is not the API at all. A DELETE at once raced the
  // socket: it ended the session first, or came after the socket had (a 404 the browser logs as an
  // error). It waits for the socket's close now, and goes only where no server answered it, or where
  // the answer was a refusal that leaves the session living (deleteUnlessTheSocketEndsIt).
  const socket = state.ws, s = state.session;
  const socketMayEndSession = socket !== null && socket.readyState === WebSocket.OPEN && !state.wsStarted;
  cleanup(!socketMayEndSession);
  if (socketMayEndSession && s) deleteUnlessTheSocketEndsIt(socket, s);
  setStatus("idle");
}

function cleanup(sendDelete = true) {
  state.generation++;
  if (state.peerRequests) state.peerRequests.abort();
  clearInterval(state.statsTimer);
  clearTimeout(state.lostTimer);
  // A WebSocket whose stream started ends its session itself, with closeWebSocket's stop message (and,
  // were that lost, by closing): a DELETE after the stop found the session ended, a 404 the browser
  // logs as an error. A socket not started may never have reached the server: the session is DELETEd.
  const socketEndsSession = state.ws !== null && state.ws.readyState === WebSocket.OPEN && state.wsStarted;
  if (sendDelete && state.session && !socketEndsSession) deleteSession(state.session);
  if (state.pc) { state.pc.onconnectionstatechange = null; state.pc.close(); }
  closeWebSocket();
  if (state.mic) state.mic.getTracks().forEach((t) => t.stop());
  // no last frame left on the stage, looking live: a <video> keeps showing its ended stream's
  clearStage();
  // the live rates go with the stream (they read as current beside 'idle'); what it came to stays
  Object.assign(stats, { fps: 0, avOffsetMs: null, rttMs: null });
  forgetFrameTimes();
  showOverlay();
  state.pc = state.mic = state.audioSender = state.session = state.peerRequests = null;
  soundNoLongerWaits();
  setNotice("");  // what the server said of a request of this connection (it stayed beside 'ended: ...')
  const focused = document.activeElement === $("hangup") || document.activeElement === $("speak");
  $("connect").disabled = false;
  $("hangup").disabled = true;
  $("speak").disabled = true;
  $("face").disabled = false;
  if (focused) $("connect").focus();
}

function clearStage() {
  const video = $("video"), canvas = $("canvas");
  video.srcObject = null;
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

async function speak(e) {
  e.preventDefault();
  // blank as the server reads it: Python's str.strip() takes \x1c-\x1f and \x85 away too, which
  // JS's trim() keeps; a text of only those (pasted) closed a WebSocket stream (4400, text is empty)
  const typed = $("speak-text").value;
  const text = typed.replace(/^[\s\x1c-\x1f\x85]+|[\s\x1c-\x1f\x85]+$/g, "");
  if (!text || !state.session) return;
  const msg = { type: "speak", text };
  // until its answer: pressed again meanwhile (the text still there), it was sent again, and spoken
  // twice over the WebSocket (over HTTP, refused: 429). (Its focus goes to the text, not the page's start.)
  if (document.activeElement === $("speak")) $("speak-text").focus();
  $("speak").disabled = true;
  if (state.ws) {
    sendSpeak(msg, typed);  // the field is emptied once the server takes it (speakTaken)
    return;
  }
  // Its answer comes once the speech is made (seconds): a hang-up meanwhile cuts it off, and one
  // that came after, from the ended session, is not the next connection's (its 404 was shown
  // over the new one's status; its 'speaking' cleared the new one's text)
  const mine = state.generation;
  try {  // (a refusal, or no answer at all, was an unhandled rejection: the page said nothing)
    const res = await apiFetch(`${state.session.resource}/control`, {
      method: "POST", body: JSON.stringify(msg), signal: state.peerRequests?.signal,
      headers: authHeaders(state.session, { "Content-Type": "application/json" }),
    }, SPEAK_ANSWER_MS);
    if (!res.ok) await apiJson(res);
  } catch (err) {
    if (mine !== state.generation) return;
    if (err.unanswered) {
      speakUnanswered();
      return;
    }
    // in the server's words, as a WebSocket page says a speak refused ("speak: text too long ..."):
    // the same refusal read "speak: 422: ..." here and "error: ..." there. An answer that is not the
    // API's (a proxy's 502 page) is its status.
    setNotice(`speak: ${err.said || err.message}`);
    $("speak").disabled = false;
    return;  // the text stays, to be sent again
  }
  if (mine !== state.generation) return;
  $("speak").disabled = false;
  speakTaken(typed);
}

$("connect").onclick = connect;
$("upload").onchange = () => {
  // a picture chosen is the face now: the notice that the address's avatar is unknown asked for one
  // still, until a connect (an avatar clicked takes it away as well)
  if ($("upload").files.length && stats.notice === unknownAvatar()) setNotice("");
  showChosenAvatar();
};
$("hangup").onclick = hangUp;
$("speak-form").onsubmit = speak;
$("mic").onchange = async () => {
  // only while connecting or connected (the hang-up button is enabled from a connect's start): the
  // microphone is taken for a connection and given back with it. Flipped while the connection has no
  // transport yet (its session requested), the box did nothing: unticked, the microphone was sent all
  // the same; ticked, none was taken. The transports take state.mic as they start.
  const mine = state.generation, on = $("mic").checked;
  // while idle the box is only the choice for the next connect, which asks the browser then: a note of
  // the last one's ("no microphone: Permission denied") stayed beside the box ticked again, as if it held
  if ($("hangup").disabled) {
    $("mic-note").textContent = "";
    return;
  }
  if (on && !state.mic) {
    const stream = await getMic();
    // hung up while the browser asked, or the box unticked meanwhile (and maybe ticked again, which
    // asked again): this microphone is nobody's. It was taken all the same, and stayed on for good.
    if (mine !== state.generation || !$("mic").checked || state.mic) {
      if (stream) stream.getTracks().forEach((t) => t.stop());
      return;
    }
    holdMic(stream);
  }
  if (state.pc && state.audioSender) {
    // a connection closed meanwhile (a hang-up, the server's end: its events come later) refuses any
    // track: there is nothing to change on it, and its refusal was an unhandled rejection
    const peer = state.pc;
    await state.audioSender.replaceTrack(on && state.mic ? state.mic.getAudioTracks()[0] : null).catch((e) => {
      if (peer.signalingState !== "closed") console.warn("microphone:", e);
    });
  }
  else if (state.ws && state.mic && !wsMicRunning()) startWsMic().catch((e) => console.warn("microphone:", e));
  if (!on && state.mic) {  // given back, not only muted: the browser's recording indicator goes off
    stopWsMic();
    state.mic.getTracks().forEach((t) => t.stop());
    state.mic = null;
  }
};
window.addEventListener("pagehide", () => {
  // The browser may keep the page left (its back/forward cache) and show it again on Back, as it
  // was: it said 'streaming' (or 'connecting') beside an enabled Connect, nothing streaming
  const inCall = !$("hangup").disabled;
  cleanup(true);
  abandonCreations();  // (a session asked for, its answer not read yet: no id to DELETE)
  if (inCall) setStatus("ended: the page was left");
});
if (params.get("mic") === "0") $("mic").checked = false;
showOverlay();
loadAvatars().catch((e) => {  // the default avatar is still there: said in the list's place
  console.warn("avatars:", e);
  $("avatars").textContent = `no avatars to choose from (${e.message})`;
}).then(() => {  // (not when a click was quicker)
  if (params.get("autostart") === "1" && !$("connect").disabled) connect();
});
