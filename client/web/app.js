// StreamDiff browser client (no build step): webcam -> POST /offer -> processed video back,
// control and stats over /ws. A `?token=...` in the page URL is sent as the Bearer token.
"use strict";

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
let pc = null, ws = null, camera = null, sessionId = null, fpsTimer = null, retryTimer = null, expect = null;
let fadeTimer = null;
// This tab's stream key: the same across its reconnects, Stops and reloads (sessionStorage), so a
// viewer of its output ("watch it elsewhere", an OBS source) keeps playing it.
function newPageKey() {
  const key = `page-${Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("")}`;
  sessionStorage.setItem("streamdiff.key", key);
  return key;
}
let PAGE_KEY = sessionStorage.getItem("streamdiff.key") || newPageKey();
let keyTaken = 0; // 409s in a row: the key held by a tab this page cannot ask (below)
// A duplicated tab copies sessionStorage, and with it the key; a reloaded one comes back to it. The
// two differ in one thing: the tab the key came from is still open. So a page asks its open tabs
// whether one holds its key, and takes a key of its own if one answers (a reload gets no answer).
const KEYS = "BroadcastChannel" in window ? new BroadcastChannel("streamdiff.keys") : null;
// An answer names the page that asked: two copies open at once each answer the other, and the
// tab they were copied from, hearing those answers, took a new key while it streamed (a page probe).
const ASKER = crypto.getRandomValues(new Uint32Array(2)).join("-");
if (KEYS) {
  KEYS.onmessage = (ev) => {
    const msg = ev.data || {};
    if (msg.holds === PAGE_KEY) KEYS.postMessage({ held: PAGE_KEY, to: msg.from }); // opened with this tab's key
    else if (msg.held === PAGE_KEY && msg.to === ASKER) { PAGE_KEY = newPageKey(); keyTaken = 0; } // this page is that tab
  };
  KEYS.postMessage({ holds: PAGE_KEY, from: ASKER });
}

// The status line. `fadeS`: a passing note (a change applied) that clears itself after that many
// seconds unless something else was said meanwhile.
function say(text, isError = false, fadeS = 0) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
  if (fadeTimer) clearTimeout(fadeTimer);
  fadeTimer = fadeS ? setTimeout(() => { if ($("message").textContent === text) say(""); }, fadeS * 1000) : null;
}

// Start and Stop swap while a stream runs; the keyboard focus follows the button that is left
// (a disabled button drops it to the page).
function streaming(on) {
  const lost = document.activeElement === $(on ? "start" : "stop");
  $("start").disabled = on;
  $("stop").disabled = !on;
  if (lost) $(on ? "stop" : "start").focus();
}

// The prompt a user typed survives a reload.
const PROMPT_KEY = "streamdiff.prompt";
function keepPrompt(prompt) {
  try { localStorage.setItem(PROMPT_KEY, prompt); } catch { /* storage off: nothing kept */ }
}
try {
  const kept = localStorage.getItem(PROMPT_KEY);
  if (kept !== null) $("prompt").value = kept;
} catch { /* storage off */ }

// A field that must hold a whole number in [lo, hi] (no hi: lo or more): its value, or the
// sentence to show is thrown (nothing is sent then).
function wholeNumber(name, lo, hi) {
  const text = $(name).value.trim();
  const range = hi === undefined ? `a whole number from ${lo} up` : `a whole number from ${lo} to ${hi}`;
  if (text === "") throw `${name} is empty: enter ${range}`;
  if (!/^\d+$/.test(text) || Number(text) < lo || (hi !== undefined && Number(text) > hi)) {
    throw `${name} ${JSON.stringify(text)} is not ${range}`;
  }
  return Number(text);
}
// Steps, noise, seed, motion and blend show the server's preset (/healthz "defaults") and then
// what the stream uses (each change's reply); the page itself holds no values, so it never shows
// one that is not in use. Only those the user has changed are sent. Each reader returns the
// value to send or throws what is wrong with it.
const FIELDS = {
  steps: () => wholeNumber("steps", 1, 4),
  noise: () => {
    const text = $("noise").value.trim();
    const value = Number(text);
    if (text === "" || !Number.isFinite(value) || value < 0.1 || value > 1) throw "noise must be a number from 0.1 to 1";
    return value;
  },
  // a page's numbers are exact up to 2^53 - 1 only: a larger seed was sent rounded (…993 ran as …992)
  seed: () => wholeNumber("seed", 0, Number.MAX_SAFE_INTEGER),
  motion: () => $("motion").checked,
  blend: () => wholeNumber("blend", 0, 64),
};
const touched = new Set();
// What the stream runs, as far as the page knows (control words, the prompt included): a change
// made elsewhere replaces a field only while it still holds this (not while its user is typing
// another), a field the user once changed included (else its next Apply would undo the change).
let inUse = {};
function holdsInUse(name) {
  if (!(name in inUse)) return false;
  return name === "motion" ? $(name).checked === Boolean(inUse[name]) : $(name).value.trim() === String(inUse[name]);
}
for (const name of Object.keys(FIELDS)) {
  for (const kind of ["input", "change"]) $(name).addEventListener(kind, () => touched.add(name));
}

// A control message. Seeds go up to 2^63 - 1 (`streamdiff control` may set one) and a page's numbers
// are exact up to 2^53 only: a larger seed keeps its text where the browser gives it (JSON.parse's
// source text), so the page does not show 9007199254740992 for a stream running 9007199254740993.
function parseMessage(text) {
  return JSON.parse(text, (key, value, context) =>
    key === "seed" && typeof value === "number" && !Number.isSafeInteger(value) && context?.source ? context.source : value);
}

// Untouched fields show `values` (control words: steps, noise, seed, motion, blend).
function showValues(values) {
  for (const [name, value] of Object.entries(values || {})) {
    if (!(name in FIELDS) || touched.has(name)) continue;
    if (name === "motion") $(name).checked = Boolean(value);
    else $(name).value = value;
  }
}

function params() {
  const out = { prompt: $("prompt").value };
  for (const name of touched) out[name] = FIELDS[name]();
  return out;
}

// Before a start the page makes by itself (the server came back), a field the user left invalid
// and never applied is let go: it shows the value in use instead of stopping the recovery.
function dropInvalidFields() {
  for (const name of [...touched]) {
    try {
      FIELDS[name]();
    } catch {
      touched.delete(name);
    }
  }
}

// The line under the controls describes the demo (what `make run` serves); another preset says
// what it is, and one with random weights that its picture is noise.
const DEMO_ABOUT = $("about").textContent;
let modelName = null; // the preset the server runs (/healthz `model`)
function describeModel(model) {
  if (!model) return;
  modelName = model.config;
  $("about").textContent = model.config === "demo" ? DEMO_ABOUT : model.random_weights
    ? `This server runs "${model.config}", which has random weights: the right-hand picture is noise ` +
      "(every part of the system runs, with no trained model); make run serves the demo, a small trained model."
    : `This server runs the "${model.config}" preset.`;
}

// What a model that knows only a few prompts (the demo's nine names) makes of the prompt sent:
// the server's replies carry it as `means`; a prompt it does not know comes back as "a photo".
function showMeans(prompt, means) {
  if (!means) {
    $("means").textContent = "";
  } else if (prompt.toLowerCase().split(/\s+/).filter(Boolean).join(" ") === means) {
    $("means").textContent = `style: ${means}`;
  } else {
    const unknown = means === "a photo" ? " (the model knows only the nine suggested prompts)" : "";
    const what = prompt.trim() ? `"${prompt}"` : "an empty prompt";
    $("means").textContent = `the model reads ${what} as: ${means}${unknown}`;
  }
}

// The server listens while its model warms up (a few seconds on a CPU, longer on a GPU that
// compiles): the page says so until it is ready; a Start meanwhile waits for it.
const FIRST_VISIT = "Press Start webcam and allow the camera: your picture streams to the server and comes back restyled.";
const WARMING = "The server is still warming up its model: Start webcam works now, the stream begins once it is ready.";
let warming = false;
const NEEDS_TOKEN = "This server wants a token: open the page as /?token=YOUR_TOKEN (`streamdiff serve` prints that address).";
let frameShape = ""; // the model's frame shape (/healthz `video`): the camera preview's crop

async function loadDefaults() {
  try {
    const health = await (await fetch("healthz")).json();
    describeModel(health.model);
    // once a stream started the fields show what it runs (an answer that came late, or one of the
    // warm-up's polls, put the preset's values back over another controller's change: a page probe)
    if (!pc) showValues(health.defaults);
    if (health.video && health.video.width && health.video.height) {
      frameShape = `${health.video.width} / ${health.video.height}`;
    }
    warming = health.state === "warming";
    if (health.token_required && !token) { // said on load, before the camera is asked for (a page probe)
      if (!pc && [FIRST_VISIT, WARMING, ""].includes($("message").textContent)) say(NEEDS_TOKEN, true);
      if (warming) setTimeout(loadDefaults, 1000);
    } else if (warming) {
      if (!pc && [FIRST_VISIT, ""].includes($("message").textContent)) say(WARMING);
      setTimeout(loadDefaults, 1000);
    } else if ($("message").textContent === WARMING) {
      say(FIRST_VISIT);
    }
  } catch (err) {
    // not answered (the server restarting): the fields stay empty until it answers
    setTimeout(loadDefaults, 2000);
  }
}

function waitGathering(peer) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => {
      if (peer.iceGatheringState === "complete") {
        peer.removeEventListener("icegatheringstatechange", check);
        resolve();
      }
    };
    peer.addEventListener("icegatheringstatechange", check);
    setTimeout(resolve, 3000); // send what we have
  });
}

// Every Start and every Stop begins a new run; a start() that finds, after one of its awaits,
// that its run is over (Stop pressed while the camera was being asked for, or Start again)
// gives back what it got instead of streaming behind the user's back.
let run = 0;

async function start() {
  const mine = ++run;
  const over = () => mine !== run;
  streaming(true);
  let sent;
  try {
    sent = params();
  } catch (problem) {
    say(`${problem}; nothing was started`, true);
    return stop();
  }
  if (!camera && !window.isSecureContext) { // the browser hides the camera: say why, not "refused"
    say(`This browser gives the camera only to pages on https or on localhost, and this page is ${location.origin}. ` +
        "Open it on the server's machine (http://localhost:PORT/), through an SSH tunnel " +
        "(ssh -L 8000:127.0.0.1:8000 SERVER), or behind an https proxy.", true);
    return stop();
  }
  if (!camera) {
    say("asking for the camera…");
    let got;
    try {
      got = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    } catch (err) {
      if (over()) return;
      // each cause its own advice (a probe: a machine without a camera was told to allow access)
      const why = {
        NotAllowedError: "The camera was refused. Allow camera access for this page and try again.",
        NotFoundError: "No camera was found. Connect one (or enable it) and try again.",
        NotReadableError: "The camera is in use by another program or failed to start. Close the other " +
          "program (a video call, OBS's own capture) and try again.",
      }[err.name] || "The camera could not be opened. Check it and this page's camera permission, and try again.";
      say(`${why} (${err.name})`, true);
      return stop();
    }
    if (over()) return got.getTracks().forEach((t) => t.stop());
    camera = got;
    $("local").srcObject = camera;
    // cropped to the model's frame shape from the first picture, not once output plays (a page
    // probe: "your camera, as the model is given it" showed the whole 4:3 picture while
    // connecting, busy or reconnecting)
    if (!$("output").videoWidth) $("local").style.aspectRatio = frameShape;
    // unplugged, or its permission taken back: say so now (the picture froze for 10 s, then the
    // server ended the stream for want of video)
    got.getVideoTracks().forEach((t) => t.addEventListener("ended", () => {
      if (camera === got) end("Your camera stopped (unplugged, or its permission was taken back)");
    }));
  }
  const peer = new RTCPeerConnection({ iceServers: [] });
  pc = peer;
  camera.getTracks().forEach((t) => peer.addTrack(t, camera));
  peer.addEventListener("track", (ev) => { $("output").srcObject = ev.streams[0] || new MediaStream([ev.track]); });
  $("overlay").textContent = "–";
  peer.addEventListener("connectionstatechange", () => {
    if (pc !== peer) return;
    if (peer.connectionState === "failed") { // the network went away: come back when it does
      reconnect("The connection to the server failed");
    } else if (peer.connectionState === "disconnected") {
      say("the connection is interrupted; waiting for it to come back…", true);
    }
  });
  await peer.setLocalDescription(await peer.createOffer());
  await waitGathering(peer);
  if (over()) return peer.close();
  say(warming ? "connecting… (the server is still warming up its model)" : "connecting…");
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  let resp;
  try {
    // input_fps: what the camera sends at, so that what the page is told to expect assumes it (the
    // server measures it once frames come; a 15 fps camera was told 30 fps until then)
    const rate = camera.getVideoTracks()[0]?.getSettings().frameRate;
    const input = rate >= 1 && rate <= 240 ? { input_fps: rate } : {};
    resp = await fetch("offer", { method: "POST", headers, body: JSON.stringify({ sdp: peer.localDescription.sdp, type: "offer", key: PAGE_KEY, ...sent, ...input }) });
  } catch (err) {
    if (over()) return peer.close();
    return reconnect(`Cannot reach the StreamDiff server at ${location.host} (is it running?)`);
  }
  // JSON from the handler; a plain-text sentence from the body checks (too large, not JSON)
  const raw = await resp.text().catch(() => "");
  let body;
  try {
    body = JSON.parse(raw);
  } catch {
    body = { error: raw.trim() };
  }
  if (over()) { // stopped meanwhile: a peer that never connected tells the server nothing
    if (resp.ok && body.session) endSession(body.session);
    return peer.close();
  }
  if (resp.status === 503) {
    peer.close();
    pc = null;
    return retryLater(parseInt(resp.headers.get("Retry-After") || "10", 10), body.error || "no free stream slot");
  }
  if (resp.status === 409) { // this tab's previous stream (a dropped connection) is not freed yet
    peer.close();
    pc = null;
    if (++keyTaken >= 3) { PAGE_KEY = newPageKey(); keyTaken = 0; } // another tab has it (not one this page can ask)
    return retryLater(parseInt(resp.headers.get("Retry-After") || "3", 10),
                      "this page's stream is still in use (its previous stream ending, or another tab of this page)");
  }
  keyTaken = 0;
  if (resp.status === 401) {
    say(token ? "The server refused this page's token (?token= in its address): it may have been restarted with " +
                "another one. Open the page with the new token (`streamdiff serve` prints that address)."
              : NEEDS_TOKEN, true);
    return stop();
  }
  if (!resp.ok) {
    say(`The server refused the session: ${body.error || `HTTP ${resp.status}`}`, true);
    return stop();
  }
  sessionId = body.session;
  expect = body.expect || null;
  // a viewer page plays this session's output by its id (a WHIP stream's is its key); the server
  // gives the link, with a token that plays this stream and nothing else (never the page's own,
  // which controls every stream)
  $("watch").href = (body.watch || `/viewer.html?key=${encodeURIComponent(PAGE_KEY)}`).replace(/^\//, "");
  $("watching").hidden = false;
  // what the stream runs: the fields the offer left out show it (a field could still hold a value
  // from before, a refused change's or another controller's, after Stop and Start)
  inUse = body.params ? { ...body.params } : { ...sent };
  showValues(inUse);
  keepPrompt(sent.prompt);
  showMeans(sent.prompt, body.means);
  await peer.setRemoteDescription({ type: "answer", sdp: body.sdp });
  if (over()) return peer.close();
  openControl();
  startFpsMeter();
  $("apply").disabled = false;
  say(`streaming; the first frames take a moment${expectText()}`);
}

// The server ends the session now (Stop, or a start given up after its offer was answered): a page
// probe's Stop while the offer was on its way left a session holding the tab's key and a place for
// 30 s, and Start again waited on a 409. keepalive: it goes out even if the page is left at once.
function endSession(id) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  fetch(`sessions/${encodeURIComponent(id)}`, { method: "DELETE", headers, keepalive: true }).catch(() => {});
}

// The stream ended without the user: back to the start state, saying why and what to do.
function end(why) {
  stop();
  say(`${why}. Press Start webcam to try again.`, true);
}

// The server went away (stopped, restarted, crashed) or cannot be reached: keep the camera, ask
// /healthz every 2 s, and start again once it answers (a restarting server answers while it
// warms up). Stop gives up, and so does the page after RECONNECT_FOR_S, turning the camera off.
const RECONNECT_FOR_S = 300;
function reconnect(why) {
  const keep = camera;
  camera = null; // stop() leaves it running
  stop();
  camera = keep;
  streaming(true); // Stop cancels the wait
  const mine = run;
  const waiting = `${why}. Reconnecting once the server answers (Stop gives up)…`;
  const until = Date.now() + RECONNECT_FOR_S * 1000;
  const poll = async () => {
    retryTimer = null;
    let up = false;
    try {
      const resp = await fetch("healthz", { cache: "no-store" });
      const health = await resp.json().catch(() => ({}));
      if (mine !== run) return; // Stop (or Start) meanwhile: what it found is not for the page now
      up = resp.ok || health.state === "warming"; // a Start waits for the warm-up
      if (up) { // it may have come back with another preset: the page says what runs now
        dropInvalidFields();
        describeModel(health.model);
        showValues(health.defaults);
      }
    } catch { /* still down */ }
    if (mine !== run) return;
    if (up) return start();
    if (Date.now() > until) return end(`${why}, and it did not come back within ${RECONNECT_FOR_S / 60} minutes`);
    say(waiting, true); // again: a Start that failed may have said something else
    retryTimer = setTimeout(poll, 2000);
  };
  say(waiting, true);
  retryTimer = setTimeout(poll, 1000);
}

function expectText() {
  if (!expect) return "";
  const level = expect.service ? ` of ${expect.service}` : "";
  const how = expect.best_effort ? ` (best effort: this machine cannot reach the service level${level})` : "";
  // the latency promised is its oldest frame's (a chunk waits for its last frame): the overlay's
  // mean over frames is shorter
  return ` · expect about ${Number(expect.fps).toFixed(1)} fps and up to ${(expect.latency_ms / 1000).toFixed(1)} s latency${how}`;
}

// A refused user waits and is retried automatically, with a countdown.
function retryLater(seconds, reason) {
  let left = Math.max(1, seconds);
  const tick = () => {
    const what = reason.replace(/^busy: /, "").replace(/ \(--max-sessions\)/g, ""); // a browser user has no flags
    say(/warming up/.test(what) ? `The server is still warming up its model. Retrying in ${left} s…`
      : `The server is busy: ${what}. Retrying in ${left} s…`, true);
    if (left-- <= 0) {
      retryTimer = null;
      start();
      return;
    }
    retryTimer = setTimeout(tick, 1000);
  };
  tick();
}

// The status line clears once processed frames play.
// Fullscreen has a picture to show from then on (a probe: pressed before Start it showed black).
$("output").addEventListener("playing", () => {
  if (pc) say("");
  $("fullscreen").disabled = false;
});

// The server centre-crops the camera to the model's frame shape: the preview shows that crop.
$("output").addEventListener("resize", () => {
  const v = $("output");
  if (v.videoWidth && v.videoHeight) $("local").style.aspectRatio = `${v.videoWidth} / ${v.videoHeight}`;
});

// The server's count of this page's frames (each stats message): a camera that sends nothing (a
// frozen device, a track another app took) showed a steady "0.0 fps" and no word until the server
// ended the stream for want of video (a page probe). Said after 3 s without a frame.
let input = { frames: null, since: 0, warned: false };
function noteInput(frames) {
  if (frames === undefined) return;
  const now = Date.now();
  if (frames !== input.frames) {
    if (input.warned) say("your camera's video arrives again", false, 4);
    input = { frames, since: now, warned: false };
    return;
  }
  const idle = Math.round((now - input.since) / 1000);
  if (idle >= 3 && frames > 0) { // (from its first frame on: connecting takes its own time)
    say(`The server has had no video from your camera for ${idle} s (is another app using it?); it ends a ` +
        "stream that sends none for a few seconds", true);
    input.warned = true;
  }
}

// What the stream can expect is renewed as other streams join or leave the server (each stats
// message carries it): the page says so when the number of streams it shares with changes (a
// probe's stream, told 30 fps alone, got 10 beside two newcomers with nothing said).
function noteShare(renewed) {
  if (!renewed) return;
  const before = expect;
  expect = renewed;
  if (!before || before.streams === renewed.streams || !renewed.streams) return;
  if ($("message").className === "error") return; // a warning stays until it is resolved
  const n = renewed.streams;
  say(`${n === 1 ? "this stream runs alone on the server now" : `${n} streams share the server now`}${expectText()}`,
      false, 8);
}

// Control sockets opened again in a row for one stream (a message on one resets the count).
let controlReopens = 0;
const CONTROL_SILENT_S = 8; // stats come every second: a socket silent this long is stalled

function openControl(reopen = false) {
  // owner=1: this page holds the socket while it lives; if it drops (tab closed or crashed),
  // the server frees the stream within seconds.
  if (!reopen) {
    input = { frames: null, since: Date.now(), warned: false };
    controlReopens = 0;
  }
  const q = new URLSearchParams({ session: sessionId, owner: "1" });
  if (token) q.set("token", token);
  // relative to the page, as every address it uses: a proxy may serve it under a path of its own
  const socket = new WebSocket(new URL(`ws?${q}`, location.href.replace(/^http/, "ws")));
  ws = socket;
  let opened = false, heard = Date.now();
  socket.onopen = () => { opened = true; heard = Date.now(); };
  socket.onmessage = (ev) => {
    if (ws !== socket) return; // the page stopped or replaced this socket
    heard = Date.now();
    controlReopens = 0;
    const msg = parseMessage(ev.data);
    if (msg.type === "stats") {
      $("overlay").dataset.latency = msg.latency_ms == null ? "–" : `${Math.round(msg.latency_ms)} ms`;
      noteInput(msg.frames_received);
      noteShare(msg.expect);
    } else if (msg.type === "error") {
      // retry_after_s: other streams hold the room more steps need for now (the same may pass later)
      say(`not applied: ${msg.error}${msg.retry_after_s ? ` (try again in ${msg.retry_after_s} s or more)` : ""}`, true);
      if (msg.params) { // a refused change: the fields show what the stream uses
        for (const name of Object.keys(msg.params)) touched.delete(name);
        showValues(msg.params);
      }
    } else if (msg.type === "params") {
      const p = msg.params;
      const prompt = p.prompt.trim() ? `"${p.prompt}"` : "(empty prompt)";
      if (msg.expect) expect = msg.expect; // renewed by a steps change
      const blend = p.blend ? ` · blend over ${p.blend} chunks` : "";
      // The demo learnt noise about 0.2 (docs/demo.md): a probe's user saw noise 0.8 turn the
      // picture to coloured noise, with hints that promised more of the style. (Its steps 2-4 keep
      // the picture: its own timestep list, configs/demo.yaml.)
      const outside = modelName === "demo" && p.noise > 0.4
        ? " · the demo model is trained for noise about 0.2: expect mostly noise" : "";
      // `elsewhere`: another controller (`streamdiff control`, a second tab) changed this stream;
      // the fields follow it, except what the user is editing here
      const head = msg.elsewhere ? "changed by another controller" : "applied";
      say(`${head}: ${prompt} · steps ${p.steps} · noise ${p.noise} · seed ${p.seed} · motion-aware ${p.motion ? "on" : "off"}` +
          blend + expectText() + outside, false, outside ? 0 : 8);
      if (msg.elsewhere) {
        for (const name of [...touched]) if (holdsInUse(name)) touched.delete(name);
        if ($("prompt").value === inUse.prompt) $("prompt").value = p.prompt;
      }
      showValues(p);
      inUse = { ...p };
      keepPrompt(p.prompt);
      showMeans(p.prompt, msg.means);
    } else if (msg.type === "closed") {
      const why = msg.reason ? `The server ended this stream: ${msg.reason}`
                             : "The server ended this stream (it may have been stopped or restarted)";
      if (msg.server_stopping) reconnect(why);
      else end(why);
    }
  };
  // Closed without a word: the server stopped or crashed, the network dropped, or a proxy in
  // front dropped the socket (its timeouts, its reload) while the video played on. A proxy probe:
  // every such drop ended the stream and started another, and a proxy that passes no WebSocket
  // upgrade made a new stream every second for 5 minutes, saying only "Lost the connection".
  const lost = async () => {
    clearInterval(watchdog);
    if (ws !== socket) return;
    // the video still plays: the server keeps the stream a few seconds for its page's socket
    if (opened && pc && pc.connectionState === "connected" && controlReopens++ < 5) return openControl(true);
    if (!opened && !reopen) { // this stream's first socket never opened: does the server answer?
      let up = false;
      try {
        up = (await fetch("healthz", { cache: "no-store" })).ok;
      } catch { /* it does not */ }
      if (ws !== socket) return;
      if (up) {
        return end("The control connection (WebSocket /ws) could not be opened, though the server answers. " +
                   "Behind a proxy, it must pass WebSocket upgrades on (nginx: proxy_http_version 1.1; " +
                   "proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\")");
      }
    }
    reconnect("Lost the connection to the server");
  };
  // A socket a proxy holds open without passing anything on is replaced (a probe: a stalled one
  // froze the overlay, and Apply got no answer and no word).
  const watchdog = setInterval(() => {
    if (ws !== socket) return clearInterval(watchdog);
    if (opened && Date.now() - heard > CONTROL_SILENT_S * 1000) {
      socket.onclose = null;
      socket.close();
      lost();
    }
  }, 1000);
  socket.onclose = lost;
}

function startFpsMeter() {
  let last = null;
  fpsTimer = setInterval(async () => {
    const peer = pc;
    if (!peer) return;
    const stats = await peer.getStats();
    if (peer !== pc) return; // stopped (or restarted) while the reading was on its way
    stats.forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video") {
        // a rate needs two samples with frames: until then say "–", not a misleading 0.0
        const fps = last && r.framesDecoded && r.timestamp > last.t
          ? ((r.framesDecoded - last.frames) / ((r.timestamp - last.t) / 1000)).toFixed(1) : "–";
        last = { frames: r.framesDecoded || 0, t: r.timestamp };
        $("overlay").textContent = `${fps} fps · latency ${$("overlay").dataset.latency || "–"}`;
      }
    });
  }, 1000);
}

function stop() {
  run++; // a start() still on its way gives up at its next step
  if (fpsTimer) clearInterval(fpsTimer);
  if (retryTimer) clearTimeout(retryTimer);
  const socket = ws;
  ws = null; // before close(): its onclose then knows the page closed it
  if (socket) socket.close();
  if (sessionId) endSession(sessionId);
  if (pc) pc.close();
  if (camera) {
    camera.getTracks().forEach((t) => t.stop());
    $("local").srcObject = null; // not a frozen last picture
  }
  pc = ws = camera = sessionId = fpsTimer = retryTimer = expect = null;
  $("watching").hidden = true;
  $("output").srcObject = null;
  $("fullscreen").disabled = true;
  $("local").style.aspectRatio = "";
  $("overlay").textContent = "";
  delete $("overlay").dataset.latency;
  showMeans("", null);
  streaming(false);
  $("apply").disabled = true;
}

loadDefaults();
$("start").onclick = () => start();
$("stop").onclick = () => { stop(); say("stopped"); };
$("apply").onclick = () => {
  if (!ws || ws.readyState !== WebSocket.OPEN) return say("not streaming: press Start webcam first", true);
  try {
    ws.send(JSON.stringify({ type: "params", ...params() }));
  } catch (problem) {
    say(`not applied: ${problem}`, true);
  }
};
// Enter in a field applies it (Start applies them all).
for (const id of ["prompt", ...Object.keys(FIELDS)]) {
  $(id).addEventListener("keydown", (ev) => {
    if (ev.key !== "Enter") return;
    if ($("apply").disabled) say("press Start webcam to stream with these settings");
    else $("apply").click();
  });
}
say(FIRST_VISIT);
$("fullscreen").onclick = () => $("outpane").requestFullscreen();
window.addEventListener("beforeunload", stop);
