// The WebRTC (WHEP) connection: the offer and its trickled candidates, the connection's state and
// the overlay's figures read from it.
import { apiJson, authHeaders, deleteSession, readWhole } from "./api.js";
import { $, abandoned, serverEndedInWords, showOverlay, state, stats, waitForClickForSound } from "./page.js";

let offerPostedAt = 0;
// How long the WHEP offer may wait for the server's answer (a real server's comes within a second)
const WHEP_ANSWER_MS = 10000;

function trickleCandidates(peer, s, cutOff) {
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
        // none once the connection ends (`cutOff`), and the one going is cut off: its end DELETEs the
        // session, and a PATCH after that found it gone (a 404 on the console)
        chain = chain.then(() => cutOff.aborted ? null : fetch(location, {
          method: "PATCH", body: head.concat(lines).join("\r\n") + "\r\n", signal: cutOff,
          headers: authHeaders(s, { "Content-Type": "application/trickle-ice-sdpfrag", "If-Match": etag }),
        })).then((res) => {
          if (res === null) return;
          if (res.ok && lines.length > 1) stats.trickled++;
          else if (!res.ok) console.warn(`trickle ICE: PATCH ${res.status}`);
        }, (err) => { if (!cutOff.aborted) console.warn("trickle ICE:", err); });
      };
      queued.splice(0).forEach(send);
    },
  };
}

// ended(reason): the connection ended by itself (the page is given back, and says why)
export async function connectWebRTC(mine, ended) {
  // (its own peer and session, not the globals: hung up and connected again while it waited, an
  // attempt that went on would post its answer into the next connection's peer)
  const s = state.session;
  // STUN/TURN as the server was told (serve --ice-servers); none on a LAN or the same machine
  const peer = state.pc = new RTCPeerConnection({ iceServers: s.ice_servers || [] });
  const media = new MediaStream();
  peer.ontrack = (e) => {
    media.addTrack(e.track);
    $("video").srcObject = media;
  };
  peer.addTransceiver("video", { direction: "recvonly" });
  const audio = peer.addTransceiver("audio", { direction: "sendrecv" });
  state.audioSender = audio.sender;
  if (state.mic) await audio.sender.replaceTrack(state.mic.getAudioTracks()[0]);
  abandoned(mine);
  const requests = state.peerRequests = new AbortController();  // (aborted as it ends: `cleanup`, `closePeer`)
  // every request of this connection is cut off as it ends: one still on its way then went after
  // the hang-up's DELETE and found the session gone (a 404 on the console)
  const cutOff = requests.signal;
  const trickle = trickleCandidates(peer, s, cutOff);
  await peer.setLocalDescription(await peer.createOffer());
  abandoned(mine);
  offerPostedAt = performance.now();
  const offer = peer.localDescription.sdp;
  trickle.posted(offer);
  // an offer the server never answers (a proxy that holds it) is given up, as the 5 s to connect are:
  // the page said 'connecting' for good, with no fallback to the WebSocket
  const answerTimer = setTimeout(() => requests.abort(new Error(`WHEP: no answer in ${WHEP_ANSWER_MS / 1000} s`)),
    WHEP_ANSWER_MS);
  let res;
  try {  // (its body too: one that never ended left the page 'connecting' for good)
    res = await readWhole(await fetch(s.whep, {
      method: "POST", body: offer, signal: cutOff, headers: authHeaders(s, { "Content-Type": "application/sdp" }),
    }));
  } finally {
    clearTimeout(answerTimer);
  }
  abandoned(mine);
  // a refusal in the server's words (its body was the API's JSON, said whole)
  if (!res.ok) await apiJson(res).catch((e) => { throw new Error(`WHEP ${e.message}`); });
  if (res.status !== 201) throw new Error(`WHEP ${res.status}: no SDP answer`);
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
  // DELETE from elsewhere, shutdown) or the network went; the page says so and frees what it holds.
  // A network path gone (another Wi-Fi, UDP dropped) may leave the server answering HTTP with the
  // session still on it until its peer timeout (10 s; ICE consent's ~30 s with --peer-timeout 0):
  // a reconnect meanwhile on a server of one session met a 503. The page DELETEs it (best effort:
  // deleteSession says a failure on the console, and a 404 is a session the server ended already).
  const lost = () => {
    deleteSession(s);
    ended("the connection was lost");
  };
  peer.onconnectionstatechange = () => {
    if (mine !== state.generation) return;
    const connection = peer.connectionState;
    clearTimeout(state.lostTimer);
    if (connection === "failed" || connection === "closed") lost();
    else if (connection === "disconnected") {  // ICE may still recover it
      state.lostTimer = setTimeout(() => { if (mine === state.generation) lost(); }, 5000);
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
    if (mine !== state.generation) return;
    video.muted = true;
    video.play().catch(() => {});
    waitForClickForSound();
  });
  // A server gone without a word (killed, its machine down) sends no DTLS close and stops the
  // frames: ICE called the connection lost ~11 s later. Two session checks in a row unanswered,
  // no frame decoded between them, say it in 2-4 s (one failed check alone may be a network blip).
  let ticks = 0, unanswered = 0, framesAtCheck = -1;
  state.statsTimer = setInterval(() => {
    readRtcStats(peer, mine);
    // a session the server ended while the peer connection lingers (ICE takes its time to fail)
    if (++ticks % 4 === 0) {
      checkSessionAlive(s, cutOff, mine, ended).then((answered) => {
        const frozen = stats.framesDecoded === framesAtCheck;
        framesAtCheck = stats.framesDecoded;
        unanswered = answered || !frozen ? 0 : unanswered + 1;
        if (unanswered >= 2 && mine === state.generation) ended("the server is not answering");
      });
    }
  }, 500);
  // A server that closes the connection (a limit, a DELETE, its shutdown) sends DTLS's close_notify:
  // the transport is "closed" at once, where the peer connection stays "connected" until ICE gives
  // up. A server shut down answers no session check either: the page said so ~10 s later.
  const transports = new Set(peer.getReceivers().map((r) => r.transport).filter(Boolean));
  for (const transport of transports) {
    transport.addEventListener("statechange", () => {
      if (transport.state === "closed" && mine === state.generation) checkSessionAlive(s, cutOff, mine, ended, true);
    });
  }
}

// How long a session check may wait for its answer, its body included. The browser sets no limit: an
// answer that never came, or a 404 whose body stalled after its headers (a proxy), hung the check,
// and after the transport's close the page said 'streaming' over a frozen frame until ICE gave up.
const SESSION_CHECK_MS = 5000;

// closed: the server closed the connection, so the session ends whatever the check finds (a server
// gone answers nothing; one that answers says why where it knows). Whether the server answered.
export async function checkSessionAlive(s, cutOff, mine, ended, closed = false) {
  // cut off already: its abort fired before the listener below was there, and the GET went all the
  // same (up to its limit), a 404 for the session the connection's end DELETEd said as its end
  if (cutOff.aborted) return true;
  // (its own signal, cut off with the connection's or at its limit; the listener removed as it
  // settles, as apiFetch's: the connection's signal outlives its checks)
  const limit = new AbortController();
  const cut = () => limit.abort();
  cutOff.addEventListener("abort", cut, { once: true });
  const limitTimer = setTimeout(cut, SESSION_CHECK_MS);
  try {
    const res = await fetch(s.resource, { headers: authHeaders(s), signal: limit.signal });
    if (res.status !== 404) {
      if (closed && mine === state.generation) ended("the server closed the connection");
      return true;
    }
    // the server says why where it knows (a limit, a DELETE from elsewhere, its model gone); a body
    // not read within the limit (cut off by its signal) says nothing, the 404 alone the session's end
    const { message = "" } = await res.json().catch(() => ({}));
    const why = message.startsWith("session ended: ") ? message.slice(15) : "";
    if (mine === state.generation) ended(why ? serverEndedInWords(why) : "the server ended the session");
    return true;
  } catch (e) {
    if (cutOff.aborted) return true;  // cut off: the connection ended, nothing to say
    if (closed && mine === state.generation) ended("the server closed the connection and is not answering");
    else console.warn("session check:", limit.signal.aborted ? `no answer in ${SESSION_CHECK_MS / 1000} s` : e);
    return false;
  } finally {
    clearTimeout(limitTimer);
    cutOff.removeEventListener("abort", cut);
  }
}

async function readRtcStats(peer, mine) {
  const report = await peer.getStats();
  // hung up while it read (and maybe connected again): the figures are another connection's
  if (mine !== state.generation) return;
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

export function closePeer() {
  // a failed WebRTC attempt: its peer connection and its session (bound to WHEP once offered).
  // Resolved once the session's DELETE is answered (or failed).
  if (state.peerRequests) state.peerRequests.abort();
  if (state.pc) { state.pc.onconnectionstatechange = null; state.pc.close(); }
  const ended = state.session ? deleteSession(state.session) : Promise.resolve();
  state.pc = state.audioSender = state.session = state.peerRequests = null;
  return ended;
}
