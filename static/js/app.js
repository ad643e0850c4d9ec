// The page: asks the relay what this client may use (GET /v1/relay/options), wires the controls
// to a Session (over /ws), a Call (the same conversation over WebRTC, where the tier allows it) or
// Captions for a transcription-only session (session.js), and renders its state, transcript or
// captions, level and latency.

import { loadWorklets, opusSupport } from "./audio.js";
import { describe } from "./errors.js";
import { Call, Captions, Session } from "./session.js";

const $ = (id) => document.getElementById(id);
const el = {
  status: $("status"),
  banner: $("demo-banner"),
  form: $("connect-form"),
  kind: $("kind"),
  kinds: document.querySelectorAll('input[name="kind"]'),
  transport: $("transport"),
  transports: document.querySelectorAll('input[name="transport"]'),
  key: $("key"),
  model: $("model"),
  modelField: $("model-field"),
  voice: $("voice"),
  voiceField: $("voice-field"),
  opus: $("opus"),
  opusField: $("opus-field"),
  connect: $("connect"),
  modes: document.querySelectorAll('input[name="mode"]'),
  ptt: $("ptt"),
  level: $("level"),
  levelBar: $("level-bar"),
  latency: $("latency"),
  latencyBox: $("latency-box"),
  conversation: $("conversation-panel"),
  transcript: $("transcript"),
  captionsPanel: $("captions-panel"),
  captions: $("captions"),
  composer: $("composer"),
  text: $("text"),
  image: $("image"),
  attachment: $("attachment"),
  send: $("send"),
  error: $("error"),
};

const STATES = {
  idle: "Not connected",
  connecting: "Connecting…",
  listening: "Listening",
  user: "Hearing you…",
  thinking: "Thinking…",
  transcribing: "Transcribing…",
  speaking: "Speaking",
  refused: "Refused",
  closed: "Disconnected",
};
const MAX_IMAGE_SIDE = 1024; // px; larger images are scaled down before sending

let options = null; // the relay's answer for the current key
let session = null;
let image = null; // {dataUrl, name} waiting to be sent
window.relayStats = null; // the session's counters, for the curious and for the browser tests

// -- state and errors -------------------------------------------------------------------------

function setState(state, detail = "") {
  el.status.dataset.state = state;
  el.status.textContent = detail ? `${STATES[state]}: ${detail}` : STATES[state];
  const live = session !== null && !["idle", "refused", "closed"].includes(state);
  el.connect.textContent = live ? "Disconnect" : "Connect";
  for (const control of [el.key, el.model, el.opus, ...el.kinds, ...el.transports]) control.disabled = live;
  for (const control of [el.text, el.image, el.send]) control.disabled = !live || state === "connecting";
  el.ptt.disabled = !live || state === "connecting" || mode() !== "ptt";
  el.ptt.setAttribute("aria-pressed", String(state === "user" && mode() === "ptt"));
}

function showError(message) {
  el.error.textContent = message;
  el.error.hidden = !message;
}

// -- what the relay allows ----------------------------------------------------------------------

async function loadOptions() {
  const headers = el.key.value ? { Authorization: `Bearer ${el.key.value}` } : {};
  try {
    const response = await fetch("/v1/relay/options", { headers });
    const body = await response.json();
    if (!response.ok) {
      options = null;
      fill(el.model, []);
      fill(el.voice, []);
      offerCaptions(false);
      showError(describe(body.error?.code, body.error?.message));
      return;
    }
    options = body;
  } catch {
    options = null;
    offerCaptions(false);
    showError("The relay cannot be reached.");
    return;
  }
  showError("");
  el.banner.hidden = !options.demo;
  fill(el.model, options.models, options.models[0]);
  fill(el.voice, options.voices, options.voice);
  el.voice.disabled = !options.client_may_set.includes("audio.output.voice");
  for (const radio of el.modes) radio.checked = radio.value === tierMode();
  offerCaptions(options.transcription === true);
  el.ptt.disabled = true;
}

/** Offer Captions only to tiers that may open transcription sessions. */
function offerCaptions(allowed) {
  el.kind.hidden = !allowed;
  if (!allowed) el.kinds[0].checked = true; // Conversation
  showKind();
}

/** The turn taking the relay sets up for this tier. */
function tierMode() {
  return options?.turn_detection ? "vad" : "ptt";
}

/**
 * The controls and panel of the chosen kind of session. Captions have no model, voice or
 * latency, and keep the tier's turn taking (the page never updates a transcription session);
 * they go over /ws, as do conversations unless the tier allows WebRTC and it is chosen.
 */
function showKind() {
  const captions = kind() === "captions";
  el.modelField.hidden = el.voiceField.hidden = el.latencyBox.hidden = captions;
  el.transport.hidden = captions || !offersWebrtc();
  el.opusField.hidden = !captions && transport() === "webrtc"; // WebRTC brings its own Opus
  el.conversation.hidden = captions;
  el.captionsPanel.hidden = !captions;
  if (!options) return; // turn taking stays as it was until the relay answers
  const canSwitch = !captions && options.client_may_set.includes("audio.input.turn_detection");
  for (const radio of el.modes) {
    radio.disabled = !canSwitch;
    if (captions) radio.checked = radio.value === tierMode();
  }
}

function kind() {
  return [...el.kinds].find((radio) => radio.checked)?.value || "conversation";
}

/** Whether this tier may make WebRTC calls (`transports` holds "webrtc"; else /ws only). */
function offersWebrtc() {
  return options?.transports?.includes("webrtc") === true;
}

function transport() {
  const chosen = [...el.transports].find((radio) => radio.checked)?.value;
  return chosen === "webrtc" && offersWebrtc() ? "webrtc" : "websocket";
}

function fill(select, values, selected) {
  select.replaceChildren(...values.map((value) => new Option(value, value, false, value === selected)));
}

function mode() {
  return [...el.modes].find((radio) => radio.checked)?.value || "vad";
}

// -- connecting -------------------------------------------------------------------------------

const RESUME_TIMEOUT_MS = 5000;

/** A promise that rejects with `message` after `ms`. */
function timeout(ms, message) {
  return new Promise((_, reject) => setTimeout(() => reject(new Error(message)), ms));
}

async function connect() {
  showError("");
  if (!options) await loadOptions();
  if (!options) {
    // The options endpoint refused us: connecting would be refused for the same reason, but
    // try anyway so the relay's own words are shown.
    options = { models: [], voices: [], voice: "", client_may_set: [], turn_detection: {} };
  }
  // The AudioContext is made here, inside the click: browsers only start audio on a gesture.
  // No sampleRate: the device's rate is used and both worklets resample (Firefox cannot open
  // a 24 kHz context on a 48 kHz device).
  const ctx = new AudioContext({ latencyHint: "interactive" });
  const resumed = ctx.resume();
  el.transcript.replaceChildren();
  el.captions.replaceChildren();
  el.latency.textContent = "—";
  const Kind = kind() === "captions" ? Captions : transport() === "webrtc" ? Call : Session;
  session = new Kind({
    ctx,
    options,
    model: el.model.value,
    voice: el.voice.value,
    key: el.key.value.trim(),
    mode: mode(),
    opus: el.opus.checked && Kind !== Call ? await opusSupport(ctx.sampleRate) : { input: false, output: false },
    ui,
  });
  const current = session;
  window.relayStats = session.stats;
  setState("connecting");
  try {
    // Firefox with no output device never settles resume(): say so instead of waiting forever.
    const stuck = "the browser could not start audio output (is a sound device available?)";
    await Promise.race([resumed, timeout(RESUME_TIMEOUT_MS, stuck)]);
    await loadWorklets(ctx);
    await session.connect();
  } catch (error) {
    if (session !== current) return; // already closed (refused, or disconnected by the user)
    const message =
      error?.name === "NotAllowedError"
        ? "The microphone is blocked. Allow it in the browser's site settings and connect again."
        : error?.name === "SyntaxError" // new WebSocket() refuses the key (a Call too, alike)
          ? "That key has characters a browser cannot send. Check it and try again."
          : `Could not start audio: ${error?.message || error}`;
    session?.close();
    session = null;
    setState("closed", message);
  }
}

function disconnect() {
  session?.close();
  session = null;
  setState("idle");
}

// Callbacks from the session.
const ui = {
  state: (state) => session && setState(state),
  error: (message) => showError(message),
  level: (rms) => {
    // -60 dBFS .. 0 dBFS onto 0..100 %
    const percent = Math.max(0, Math.min(100, ((20 * Math.log10(rms + 1e-9) + 60) / 60) * 100));
    el.levelBar.style.width = `${percent}%`;
    el.level.setAttribute("aria-valuenow", String(Math.round(percent)));
  },
  user: (itemId, text, final) => bubble(itemId, "user", text || (final ? "(no words)" : "…"), final),
  assistant: (itemId, text, final) => bubble(itemId, "assistant", text, final),
  latency: (itemId, ms) => {
    const figure = `${Math.round(ms)} ms`;
    el.latency.textContent = figure;
    const meta = bubble(itemId, "assistant").querySelector(".meta");
    meta.textContent = `first audio after ${figure}`;
  },
  interrupted: (itemId) => bubble(itemId, "assistant").classList.add("interrupted"),
  caption: (itemId, text, status, detail) => caption(itemId, text, status, detail),
  tool: (callId, name, args) => {
    const entry = toolLine(callId, name);
    if (entry.dataset.done) return; // the output is in already
    const shown = args === null ? "" : brief(describeArguments(args), MAX_ARGUMENTS_CHARS);
    entry.querySelector(".text").textContent = `looking up ${entry.dataset.name}(${shown})…`;
  },
  toolOutput: (callId, output) => {
    const entry = toolLine(callId);
    entry.dataset.done = "true";
    const text = `${entry.dataset.name} → ${brief(compactOutput(output), MAX_OUTPUT_CHARS)}`;
    entry.querySelector(".text").textContent = text;
  },
  closed: (state, reason) => {
    session = null;
    setState(state, reason);
    if (state === "refused") showError(reason);
    el.levelBar.style.width = "0%";
  },
};

// -- transcript -------------------------------------------------------------------------------

/** The transcript entry for `itemId`, created on first use; updates its text if given. */
function bubble(itemId, role, text, final = false) {
  let entry = el.transcript.querySelector(`[data-item="${CSS.escape(itemId)}"]`);
  if (!entry) {
    entry = document.createElement("li");
    entry.className = `turn ${role}`;
    entry.dataset.item = itemId;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("p");
    body.className = "text";
    const meta = document.createElement("span");
    meta.className = "meta";
    entry.append(who, body, meta);
    el.transcript.append(entry);
  }
  if (text !== undefined) {
    entry.querySelector(".text").textContent = text;
    entry.classList.toggle("streaming", !final);
  }
  entry.scrollIntoView({ block: "nearest" });
  return entry;
}

// -- captions ---------------------------------------------------------------------------------

/**
 * The captions line of turn `itemId`: the text so far ("partial"), the completed transcript
 * ("final"; an empty one removes the line) or what was heard before it failed ("failed").
 */
function caption(itemId, text, status, detail = "") {
  let line = el.captions.querySelector(`[data-item="${CSS.escape(itemId)}"]`);
  if (status === "final" && !text) {
    line?.remove(); // a turn with no words (a cough, a door) leaves no line
    return;
  }
  if (!line) {
    line = document.createElement("li");
    line.className = "caption";
    line.dataset.item = itemId;
    const body = document.createElement("span");
    body.className = "text";
    const meta = document.createElement("span");
    meta.className = "meta";
    line.append(body, meta);
    el.captions.append(line);
  }
  line.querySelector(".text").textContent = text || (status === "partial" ? "…" : "");
  line.querySelector(".meta").textContent =
    status === "failed" ? `Not transcribed${detail ? `: ${detail}` : ""}` : "";
  line.classList.toggle("streaming", status === "partial");
  line.classList.toggle("failed", status === "failed");
  line.scrollIntoView({ block: "nearest" });
}

// -- server tool activity (only when the relay's tier shows tool calls) ---------------------

const MAX_ARGUMENTS_CHARS = 80;
const MAX_OUTPUT_CHARS = 160;

/** The transcript line of tool call `callId`, created on first use. */
function toolLine(callId, name) {
  const key = `tool:${callId}`;
  let entry = el.transcript.querySelector(`[data-item="${CSS.escape(key)}"]`);
  if (!entry) {
    entry = document.createElement("li");
    entry.className = "turn tool";
    entry.dataset.item = key;
    entry.dataset.name = name || "a tool";
    const body = document.createElement("p");
    body.className = "text";
    body.textContent = `looking up ${entry.dataset.name}…`;
    entry.append(body);
    el.transcript.append(entry);
  } else if (name) {
    entry.dataset.name = name;
  }
  entry.scrollIntoView({ block: "nearest" });
  return entry;
}

/** `{"city": "Paris", "days": 2}` as `city: Paris, days: 2`; other text as it is. */
function describeArguments(text) {
  let value;
  try {
    value = JSON.parse(text);
  } catch {
    return String(text ?? "");
  }
  if (!value || typeof value !== "object" || Array.isArray(value)) return JSON.stringify(value);
  return Object.entries(value)
    .map(([key, inner]) => `${key}: ${typeof inner === "string" ? inner : JSON.stringify(inner)}`)
    .join(", ");
}

/** A tool's output on one line: JSON compacted, other text as it is. */
function compactOutput(text) {
  try {
    return JSON.stringify(JSON.parse(text));
  } catch {
    return text.replace(/\s+/g, " ").trim();
  }
}

function brief(text, limit) {
  return text.length > limit ? `${text.slice(0, limit - 1)}…` : text;
}

let localItems = 0;

function sendComposed(event) {
  event.preventDefault();
  const text = el.text.value.trim();
  if (!session || (!text && !image)) return;
  const entry = bubble(`local-${++localItems}`, "user", text, true);
  if (image) {
    const picture = document.createElement("img");
    picture.src = image.dataUrl;
    picture.alt = `Attached image ${image.name}`;
    entry.querySelector(".text").before(picture);
    session.sendImage(image.dataUrl, text);
  } else {
    session.sendText(text);
  }
  el.text.value = "";
  clearImage();
}

/** Read the chosen image as a data URL, scaled to at most MAX_IMAGE_SIDE (JPEG). */
async function attachImage() {
  const file = el.image.files[0];
  if (!file) return;
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, MAX_IMAGE_SIDE / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(bitmap.width * scale);
  canvas.height = Math.round(bitmap.height * scale);
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  image = { dataUrl: canvas.toDataURL("image/jpeg", 0.85), name: file.name };
  el.attachment.textContent = `Image attached: ${file.name}`;
  el.attachment.setAttribute("aria-label", `Remove the attached image ${file.name}`);
  el.attachment.hidden = false;
}

function clearImage() {
  image = null;
  el.image.value = "";
  el.attachment.hidden = true;
}

// -- push-to-talk: the button (pointer or keyboard) or the space bar --------------------------

// Space talks anywhere but in fields that take it (buttons included: keyup's default, which
// would click them, is prevented while talking).
function isTyping(target) {
  return target instanceof HTMLElement && target.closest("input, textarea, select, [contenteditable]");
}

el.ptt.addEventListener("pointerdown", (event) => {
  el.ptt.setPointerCapture(event.pointerId);
  session?.press();
});
for (const type of ["pointerup", "pointercancel"]) el.ptt.addEventListener(type, () => session?.release());
document.addEventListener("keydown", (event) => {
  if ((event.code === "Space" || (event.key === "Enter" && event.target === el.ptt)) && !isTyping(event.target)) {
    if (mode() !== "ptt" || !session) return;
    event.preventDefault();
    if (!event.repeat) session.press();
  }
});
document.addEventListener("keyup", (event) => {
  if ((event.code === "Space" || event.key === "Enter") && session?.talking) {
    event.preventDefault();
    session.release();
  }
});

// -- the rest of the controls -----------------------------------------------------------------

el.form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (session) disconnect();
  else connect();
});
el.key.addEventListener("change", loadOptions);
for (const radio of [...el.kinds, ...el.transports]) radio.addEventListener("change", showKind);
el.voice.addEventListener("change", () => session?.setVoice(el.voice.value));
for (const radio of el.modes) {
  radio.addEventListener("change", () => {
    session?.setMode(mode());
    el.ptt.disabled = !session || mode() !== "ptt";
  });
}
// Leaving the page hangs up: a WebRTC call would otherwise hold its slot until the relay's idle
// timeout (the voice service does not end a call whose browser just left).
window.addEventListener("pagehide", () => session?.close());
el.composer.addEventListener("submit", sendComposed);
el.image.addEventListener("change", () => attachImage().catch(() => showError("That file is not an image this browser can read.")));
el.attachment.addEventListener("click", clearImage);
el.opus.disabled = !("AudioEncoder" in window || "AudioDecoder" in window);

setState("idle");
loadOptions();
