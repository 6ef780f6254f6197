// StreamDiff browser client (no build step): webcam -> POST /offer -> processed video back,
// control and stats over /ws. A `?token=...` in the page URL is sent as the Bearer token.
"use strict";

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
let pc = null, ws = null, camera = null, sessionId = null, fpsTimer = null, retryTimer = null, expect = null;

function say(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

// Steps, noise, seed and motion start as the server's preset has them (/healthz "defaults");
// only those the user has changed are sent, so an untouched page gets the preset's values
// (a Wan preset's 2 steps at 0.8, the demo's own) even if /healthz could not be read.
const FIELDS = {
  steps: () => parseInt($("steps").value, 10),
  noise: () => parseFloat($("noise").value),
  seed: () => parseInt($("seed").value, 10),
  motion: () => $("motion").checked,
};
const touched = new Set();
for (const name of Object.keys(FIELDS)) {
  for (const kind of ["input", "change"]) $(name).addEventListener(kind, () => touched.add(name));
}

function params() {
  const out = { prompt: $("prompt").value };
  for (const name of touched) out[name] = FIELDS[name]();
  return out;
}

// The line under the controls describes the demo (what `make run` serves); another preset says
// what it is, and one with random weights that its picture is noise.
function describeModel(model) {
  if (!model || model.config === "demo") return;
  $("about").textContent = model.random_weights
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

async function loadDefaults() {
  try {
    const health = await (await fetch("/healthz")).json();
    describeModel(health.model);
    for (const [name, value] of Object.entries(health.defaults || {})) {
      if (!(name in FIELDS) || touched.has(name)) continue;
      if (name === "motion") $(name).checked = Boolean(value);
      else $(name).value = value;
    }
  } catch (err) {
    // the fields keep the page's placeholders; untouched, they are not sent
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

async function start() {
  $("start").disabled = true;
  $("stop").disabled = false;
  if (!camera) {
    say("asking for the camera…");
    try {
      camera = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    } catch (err) {
      say(`The camera was refused or is missing (${err.name}). Allow camera access for this page and try again.`, true);
      return stop();
    }
    $("local").srcObject = camera;
  }
  pc = new RTCPeerConnection({ iceServers: [] });
  camera.getTracks().forEach((t) => pc.addTrack(t, camera));
  pc.addEventListener("track", (ev) => { $("output").srcObject = ev.streams[0] || new MediaStream([ev.track]); });
  pc.addEventListener("connectionstatechange", () => {
    if (pc && (pc.connectionState === "failed" || pc.connectionState === "disconnected")) {
      say(`connection ${pc.connectionState}`, true);
    }
  });
  await pc.setLocalDescription(await pc.createOffer());
  await waitGathering(pc);
  say("connecting…");
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  let resp;
  try {
    resp = await fetch("/offer", { method: "POST", headers, body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", ...params() }) });
  } catch (err) {
    say(`cannot reach the server: ${err}`, true);
    return stop();
  }
  if (!pc) return; // stopped meanwhile
  const body = await resp.json().catch(() => ({}));
  if (resp.status === 503) {
    pc.close();
    pc = null;
    return retryLater(parseInt(resp.headers.get("Retry-After") || "10", 10), body.error || "no free stream slot");
  }
  if (!resp.ok) {
    say(`The server refused the session: ${body.error || resp.status}`, true);
    return stop();
  }
  sessionId = body.session;
  expect = body.expect || null;
  showMeans($("prompt").value, body.means);
  await pc.setRemoteDescription({ type: "answer", sdp: body.sdp });
  openControl();
  startFpsMeter();
  $("apply").disabled = false;
  say(`streaming; the first frames take a moment${expectText()}`);
}

function expectText() {
  if (!expect) return "";
  const how = expect.best_effort ? " (best effort: this machine cannot reach the service level)" : "";
  return ` · expect about ${expect.fps} fps and ${(expect.latency_ms / 1000).toFixed(1)} s latency${how}`;
}

// A refused user waits and is retried automatically, with a countdown.
function retryLater(seconds, reason) {
  let left = Math.max(1, seconds);
  const tick = () => {
    say(`The server is busy: ${reason.replace(/^busy: /, "")}. Retrying in ${left} s…`, true);
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
$("output").addEventListener("playing", () => { if (pc) say(""); });

// The server centre-crops the camera to the model's frame shape: the preview shows that crop.
$("output").addEventListener("resize", () => {
  const v = $("output");
  if (v.videoWidth && v.videoHeight) $("local").style.aspectRatio = `${v.videoWidth} / ${v.videoHeight}`;
});

function openControl() {
  // owner=1: this page holds the socket while it lives; if it drops (tab closed or crashed),
  // the server frees the stream within seconds.
  const q = new URLSearchParams({ session: sessionId, owner: "1" });
  if (token) q.set("token", token);
  ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws?${q}`);
  ws.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.type === "stats") {
      $("overlay").dataset.latency = msg.latency_ms == null ? "–" : `${Math.round(msg.latency_ms)} ms`;
    } else if (msg.type === "error") {
      say(`control: ${msg.error}`, true);
    } else if (msg.type === "params") {
      say(`applied: ${msg.params.prompt} · steps ${msg.params.steps} · noise ${msg.params.noise} · seed ${msg.params.seed}`);
      showMeans(msg.params.prompt, msg.means);
    } else if (msg.type === "closed") {
      say("the session ended", true);
    }
  };
}

function startFpsMeter() {
  let last = null;
  fpsTimer = setInterval(async () => {
    if (!pc) return;
    const stats = await pc.getStats();
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
  if (fpsTimer) clearInterval(fpsTimer);
  if (retryTimer) clearTimeout(retryTimer);
  if (ws) ws.close();
  if (pc) pc.close(); // the server frees the session when the peer closes
  if (camera) camera.getTracks().forEach((t) => t.stop());
  pc = ws = camera = sessionId = fpsTimer = retryTimer = expect = null;
  $("output").srcObject = null;
  $("local").style.aspectRatio = "";
  $("overlay").textContent = "–";
  delete $("overlay").dataset.latency;
  showMeans("", null);
  $("start").disabled = false;
  $("stop").disabled = true;
  $("apply").disabled = true;
}

loadDefaults();
$("start").onclick = start;
$("stop").onclick = () => { stop(); say("stopped"); };
$("apply").onclick = () => {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "params", ...params() }));
};
$("prompt").addEventListener("keydown", (ev) => { if (ev.key === "Enter") $("apply").click(); });
$("fullscreen").onclick = () => $("outpane").requestFullscreen();
window.addEventListener("beforeunload", stop);
