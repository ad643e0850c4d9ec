// One conversation through the relay's /ws: the WebSocket, the microphone, the player, and the
// Realtime events between them (REALTIME.md §3-§4; flows in §12.1, §12.2 and §12.4).
//
// The UI gives callbacks (`ui.state`, `ui.user`, `ui.assistant`, `ui.latency`, `ui.interrupted`,
// `ui.tool`, `ui.toolOutput`, `ui.error`, `ui.level`, `ui.closed`) and calls the public methods:
// connect(), close(), setMode(), setVoice(), press()/release() for push-to-talk, sendText(),
// sendImage().
//
// Captions (at the end): a transcription session (`/ws?intent=transcription`) on the same socket
// and microphone code. The relay sets the session up; the page only sends audio (and, for
// push-to-talk, commits) and reports each turn's transcript through `ui.caption`.
//
// Calls (at the very end): the same conversation over WebRTC. The relay admits the call at
// `POST /v1/realtime/calls` and controls it from its side; the microphone track and the
// `oai-events` data channel then go to the voice service directly, and the answer plays from the
// remote track.
//
// Server tools: the relay runs them itself and hides their calls, unless the tier shows them
// (`show_tool_calls`): then the model's `function_call` items and their `function_call_output`
// items arrive as events, and `ui.tool(callId, name, args)` / `ui.toolOutput(callId, output)`
// report them. The page runs no tool of its own.

import { AUDIO_OUT, Microphone, OpusEncoder, Pcm16Encoder, Player, opusWireRate } from "./audio.js";
import { REFUSALS, SILENT, describe, describeCallEnd, describeClose } from "./errors.js";

const OUTPUT_RATE = 24000; // `relay_audio.samples` count 24 kHz samples (app/wire.py)
const MAX_EARLY_CHUNKS = 250; // 5 s of microphone kept while the socket opens
const MIN_PTT_MS = 120; // the server refuses commits under 100 ms (REALTIME.md §3)
const SERVER_VAD = { type: "server_vad" }; // if the relay's default is push-to-talk
// The player answers a flush within a render quantum or two; a truncate waits at most this long
// for it (sends queue behind the truncate meanwhile), then uses the last played count it reported.
const FLUSH_TIMEOUT_MS = 500;

export class Session {
  /**
   * @param {object} o
   * @param {AudioContext} o.ctx  created in the click handler (a user gesture)
   * @param {object} o.options    the body of GET /v1/relay/options
   * @param {string} o.model @param {string} o.voice @param {string} o.key ("" = anonymous)
   * @param {"vad"|"ptt"} o.mode @param {{input: boolean, output: boolean}} o.opus
   * @param {object} o.ui         callbacks, see above
   */
  constructor({ ctx, options, model, voice, key, mode, opus, ui }) {
    Object.assign(this, { ctx, options, model, voice, key, mode, ui });
    this.inputCodec = opus.input ? "opus" : "pcm16";
    this.outputCodec = opus.output ? "opus" : "pcm16";
    this.ws = null;
    this.closed = false; // cleaned up: nothing more happens
    this.live = false; // session.created seen
    this.talking = false; // push-to-talk held
    this.talkMs = 0;
    this.early = []; // microphone chunks from before the socket opened
    this.outbox = []; // sends queued behind a truncate still being measured: [{message, ready}]
    this.refusal = null; // the error event that explains a close
    this.lastError = null; // {code, message, at}: an error just before a close explains it
    this.activeResponse = null; // id (or "pending") of the response writing to the conversation
    this.wantResponse = false; // a response.create waiting for the active response to end
    this.interrupted = new Set(); // response and item ids whose late audio is dropped
    this.items = new Map(); // assistant item id -> {response, received, played} (24 kHz samples)
    this.audioItem = null; // the item the next binary frames belong to
    this.endAfterFrames = null; // item whose audio is done once its trailing frames are in
    this.turnEnd = null; // performance.now() at the end of the user's turn
    this.userText = new Map(); // user item id -> transcript so far
    this.assistantText = new Map();
    // Counters for people and tests (window.relayStats); samples are 24 kHz samples.
    this.stats = {
      inputCodec: this.inputCodec,
      outputCodec: this.outputCodec,
      contextRate: ctx.sampleRate,
      framesSent: 0,
      bytesSent: 0,
      samplesReceived: 0,
      samplesPlayed: 0,
      underruns: 0,
      droppedDeltas: 0,
      droppedFrames: 0,
      items: {},
      truncates: [],
      latencies: [],
    };
  }

  // -- lifecycle --------------------------------------------------------------------------------

  async connect() {
    this.ui.state("connecting");
    const ctx = this.ctx;
    this.player = await this.openPlayer();
    const send = (frame) => this.sendFrame(frame);
    this.encoder =
      this.inputCodec === "opus" ? new OpusEncoder(send, ctx.sampleRate) : new Pcm16Encoder(send);
    const query = this.query();
    query.set("input_codec", this.inputCodec);
    // PCM16 at the device rate (the relay resamples to 24 kHz), or Opus at the encoder's rate.
    const rate = this.inputCodec === "opus" ? opusWireRate(ctx.sampleRate) : ctx.sampleRate;
    query.set("input_rate", String(rate));
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const protocols = ["realtime"];
    if (this.key) protocols.push(`openai-insecure-api-key.${this.key}`);
    this.ws = new WebSocket(`${scheme}//${location.host}/ws?${query}`, protocols);
    this.ws.binaryType = "arraybuffer";
    this.ws.onopen = () => this.onOpen();
    this.ws.onmessage = (event) => this.onMessage(event.data);
    this.ws.onclose = (event) => this.onClose(event);
    // The microphone opens while the socket connects; early chunks wait in `this.early`.
    try {
      const mic = await Microphone.open(ctx, (samples, rms) => this.onMic(samples, rms));
      if (this.closed) mic.close(); // refused while the microphone was opening
      else this.mic = mic;
    } catch (error) {
      if (!this.closed) throw error; // else: the context is closed already, nothing to report
    }
  }

  openPlayer() {
    return Player.create(this.ctx, this.outputCodec, (m) => this.onPlayer(m));
  }

  /** The /ws query of this kind of session; connect() adds the input audio parameters. */
  query() {
    const query = new URLSearchParams({ output_codec: this.outputCodec });
    if (this.model) query.set("model", this.model); // else the tier's default model
    return query;
  }

  /** Hang up (the user's choice: no "disconnected" report follows). */
  close() {
    if (this.ws) this.ws.onclose = null;
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000);
    this.cleanup();
  }

  cleanup() {
    if (this.closed) return;
    this.closed = true;
    this.live = false;
    this.outbox = [];
    this.mic?.close();
    this.encoder?.close();
    this.player?.close();
    this.mic = this.encoder = null;
    this.ctx.close().catch(() => {});
  }

  onOpen() {
    for (const samples of this.early) this.encoder.encode(samples);
    this.early = [];
  }

  onClose(event) {
    this.end(describeClose(event.code));
  }

  /** The session is over: a refusal or a recent error says why, else `otherwise`. */
  end(otherwise) {
    const recent = this.lastError && performance.now() - this.lastError.at < 2000;
    const error = this.refusal || (recent ? this.lastError : null);
    const reason = error ? describe(error.code, error.message) : otherwise;
    const refused = error !== null && (!this.live || REFUSALS.has(error.code));
    this.cleanup();
    this.ui.closed(refused ? "refused" : "closed", reason, error?.code ?? null);
  }

  // Every event and audio frame goes out through the outbox, in the order it was sent. An
  // interruption reserves a place in it for its truncate (reserve()): what is sent after that
  // (the new speech, a typed item, response.create) waits until the truncate has been measured.

  send(event) {
    this.output(JSON.stringify(event));
  }

  sendFrame(frame) {
    this.output(frame);
  }

  output(message) {
    if (this.outbox.length) this.outbox.push({ message, ready: true });
    else this.transmit(message);
  }

  transmit(message) {
    if (this.ws?.readyState !== WebSocket.OPEN) return;
    this.ws.send(message);
    if (typeof message === "string") return;
    this.stats.framesSent++;
    this.stats.bytesSent += message.byteLength;
  }

  /** A place in the send order for a message known later; fill it with fill(message or null). */
  reserve() {
    const slot = { message: null, ready: false };
    this.outbox.push(slot);
    return (message) => {
      Object.assign(slot, { message, ready: true });
      while (this.outbox.length && this.outbox[0].ready) {
        const next = this.outbox.shift().message;
        if (next !== null) this.transmit(next);
      }
    };
  }

  // -- microphone -------------------------------------------------------------------------------

  onMic(samples, rms) {
    this.ui.level(rms);
    if (this.mode === "ptt" && !this.talking) return; // push-to-talk: only while held
    if (this.talking) this.talkMs += (samples.length * 1000) / this.ctx.sampleRate;
    if (this.ws?.readyState === WebSocket.OPEN) this.encoder.encode(samples);
    else if (this.ws?.readyState === WebSocket.CONNECTING && this.early.length < MAX_EARLY_CHUNKS)
      this.early.push(samples);
  }

  // -- choices ----------------------------------------------------------------------------------

  /** Hands-free (server VAD) or push-to-talk (turn detection off, REALTIME.md §12.2). */
  setMode(mode) {
    if (mode === this.mode) return;
    this.mode = mode;
    if (!this.live) return;
    const turnDetection = mode === "ptt" ? null : this.options.turn_detection || SERVER_VAD;
    this.send({ type: "session.update", session: { type: "realtime", audio: { input: { turn_detection: turnDetection } } } });
    if (mode === "ptt") this.send({ type: "input_audio_buffer.clear" });
    this.ui.state("listening");
  }

  setVoice(voice) {
    this.voice = voice;
    if (this.live) this.sendVoice();
  }

  sendVoice() {
    this.send({ type: "session.update", session: { type: "realtime", audio: { output: { voice: this.voice } } } });
  }

  // -- push-to-talk -----------------------------------------------------------------------------

  press() {
    if (!this.live || this.mode !== "ptt" || this.talking) return;
    this.beforeTalk();
    this.send({ type: "input_audio_buffer.clear" });
    this.talking = true;
    this.talkMs = 0;
    this.ui.state("user");
  }

  release() {
    if (!this.talking) return;
    this.talking = false;
    if (this.talkMs < MIN_PTT_MS) {
      this.send({ type: "input_audio_buffer.clear" });
      this.ui.error(describe("input_audio_buffer_commit_empty"));
      this.ui.state("listening");
      return;
    }
    this.send({ type: "input_audio_buffer.commit" });
    this.afterCommit();
  }

  beforeTalk() {
    this.interrupt(true); // not awaited: its truncate keeps its place in the send order
  }

  afterCommit() {
    this.requestResponse();
    this.turnEnd = performance.now();
    this.ui.state("thinking");
  }

  // -- typed input ------------------------------------------------------------------------------

  sendText(text) {
    this.sendUserItem([{ type: "input_text", text }]);
  }

  /** An image (a data URL) and an optional question about it, for vision models. */
  sendImage(dataUrl, text) {
    const content = [{ type: "input_image", image_url: dataUrl }];
    if (text) content.push({ type: "input_text", text });
    this.sendUserItem(content);
  }

  sendUserItem(content) {
    this.interrupt(true); // not awaited: its truncate keeps its place in the send order
    this.send({ type: "conversation.item.create", item: { type: "message", role: "user", content } });
    this.requestResponse();
    this.turnEnd = performance.now();
    this.ui.state("thinking");
  }

  /** response.create now, or once the active response is done (one at a time, §3). */
  requestResponse() {
    if (this.activeResponse) {
      this.wantResponse = true;
      return;
    }
    this.activeResponse = "pending";
    this.send({ type: "response.create" });
  }

  // -- interruption (REALTIME.md §12.4) ---------------------------------------------------------

  /**
   * Stop playback at once, drop the rest of the playing response and tell the server how much of
   * the item was heard. `cancel`: also cancel the response (push-to-talk and typed input; with
   * server VAD `interrupt_response` makes the server cancel it itself).
   *
   * Only the player knows how much was played, so the truncate is known a worklet round trip
   * later; it is sent in the place it was reserved, before anything sent after this call (§12.4:
   * the item it names must not be overtaken by the next turn). Callers need not await it.
   */
  async interrupt(cancel) {
    const response = this.activeResponse;
    if (response && response !== "pending") this.interrupted.add(response);
    if (cancel && response && response !== "pending") this.send({ type: "response.cancel" });
    const fill = this.reserve();
    let truncation = null;
    try {
      truncation = await this.truncation(response);
    } finally {
      fill(truncation && JSON.stringify(truncation.event)); // null releases the queue
    }
    if (!truncation) return;
    const { event, playedMs, receivedMs } = truncation;
    this.stats.truncates.push({ item_id: event.item_id, audio_end_ms: event.audio_end_ms, played_ms: playedMs, received_ms: receivedMs });
    this.ui.interrupted(event.item_id);
  }

  /** Stop the player: {event, playedMs, receivedMs} to truncate what it played, or null. */
  async truncation(response) {
    let timer;
    const late = new Promise((resolve) => {
      timer = setTimeout(resolve, FLUSH_TIMEOUT_MS, { itemId: null, played: 0, buffered: 0 });
    });
    const flushed = await Promise.race([this.player.flush(), late]);
    clearTimeout(timer);
    // The playing item, or the item still streaming when everything received was played.
    let itemId = flushed.itemId;
    let played = flushed.played;
    if (!itemId || flushed.buffered === 0) {
      const streaming = [...this.items].find(([, item]) => item.response === response);
      if (!streaming) return null; // nothing playing and nothing coming: nothing to truncate
      itemId = streaming[0];
      played = (streaming[1].played * this.player.sourceRate) / OUTPUT_RATE;
    }
    const item = this.items.get(itemId);
    if (!item || this.interrupted.has(itemId)) return null;
    this.interrupted.add(itemId);
    // Integer milliseconds actually played, never more than the audio received (§3).
    const playedMs = this.player.ms(played);
    const receivedMs = (item.received * 1000) / OUTPUT_RATE;
    const audioEndMs = Math.floor(Math.min(playedMs, receivedMs));
    const event = { type: "conversation.item.truncate", item_id: itemId, content_index: 0, audio_end_ms: audioEndMs };
    return { event, playedMs, receivedMs };
  }

  // -- events from the relay --------------------------------------------------------------------

  onMessage(data) {
    if (data instanceof ArrayBuffer) {
      this.onFrame(new Uint8Array(data));
      return;
    }
    if (this.endAfterFrames) {
      // A text frame after `response.output_audio.done`: its trailing frames (the Opus tail) are in.
      this.player.end(this.endAfterFrames);
      this.endAfterFrames = null;
    }
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return;
    }
    const handler = this.handlers[event.type];
    if (handler) handler.call(this, event);
  }

  onFrame(frame) {
    const itemId = this.audioItem;
    if (frame[0] !== AUDIO_OUT || !itemId || this.interrupted.has(itemId)) {
      this.stats.droppedFrames++;
      return;
    }
    this.player.push(itemId, frame.subarray(1));
  }

  /** Messages from the playback worklet: first sample of an item, counters, drained. */
  onPlayer(message) {
    if (message.type === "started") {
      if (this.turnEnd !== null) {
        // End of the user's turn -> first audio rendered, plus the device's output latency.
        const ms = performance.now() - this.turnEnd + (this.ctx.outputLatency || 0) * 1000;
        this.turnEnd = null;
        this.stats.latencies.push(Math.round(ms));
        this.ui.latency(message.itemId, ms);
      }
      if (!this.talking) this.ui.state("speaking");
    } else if (message.type === "stats") {
      const scale = OUTPUT_RATE / this.player.sourceRate;
      this.stats.samplesPlayed = Math.round(message.played * scale);
      this.stats.underruns = message.underruns;
      for (const { itemId, played } of message.items) {
        const item = this.items.get(itemId);
        if (item) item.played = Math.round(played * scale);
        this.publish(itemId);
      }
    } else if (message.type === "idle") {
      if (!this.talking && this.turnEnd === null) this.ui.state("listening");
    }
  }

  publish(itemId) {
    const item = this.items.get(itemId);
    if (item) this.stats.items[itemId] = { receivedSamples: item.received, playedSamples: item.played };
  }

  assistantItem(itemId, responseId) {
    if (!this.items.has(itemId)) this.items.set(itemId, { response: responseId, received: 0, played: 0 });
    return this.items.get(itemId);
  }

  onToolOutput(item) {
    if (item?.type === "function_call_output" && typeof item.output === "string") {
      this.ui.toolOutput(item.call_id, item.output);
    }
  }

  onError(event) {
    const { code, message } = event.error || {};
    if (code === "conversation_already_has_active_response") this.wantResponse = true;
    if (SILENT.has(code)) return;
    if (REFUSALS.has(code) || !this.live) this.refusal = { code, message };
    this.lastError = { code, message, at: performance.now() };
    this.ui.error(describe(code, message), code);
  }
}

// Server event type -> handler (called with `this` = the session).
Session.prototype.handlers = {
  error: Session.prototype.onError,

  "session.created"() {
    this.live = true;
    if (this.voice && this.voice !== this.options.voice) this.sendVoice();
    if (this.mode === "ptt") {
      this.send({ type: "session.update", session: { type: "realtime", audio: { input: { turn_detection: null } } } });
    }
    this.ui.state("listening");
  },

  "input_audio_buffer.speech_started"(event) {
    this.ui.user(event.item_id, "", false);
    this.ui.state("user");
    // Barge-in. With `interrupt_response` (the default) the server cancels the response itself.
    // Not awaited: the new speech's frames queue behind the truncate (see reserve()).
    const turnDetection = this.options.turn_detection || {};
    this.interrupt(turnDetection.interrupt_response === false);
  },

  "input_audio_buffer.speech_stopped"() {
    this.turnEnd = performance.now();
    this.ui.state("thinking");
  },

  "input_audio_buffer.committed"(event) {
    this.ui.user(event.item_id, this.userText.get(event.item_id) || "", false);
  },

  "conversation.item.input_audio_transcription.delta"(event) {
    const text = (this.userText.get(event.item_id) || "") + (event.delta || "");
    this.userText.set(event.item_id, text);
    this.ui.user(event.item_id, text, false);
  },

  "conversation.item.input_audio_transcription.completed"(event) {
    this.userText.set(event.item_id, event.transcript || "");
    this.ui.user(event.item_id, event.transcript || "", true);
  },

  "response.created"(event) {
    this.activeResponse = event.response.id;
  },

  "response.output_item.added"(event) {
    if (event.item?.type === "message" && event.item.role === "assistant") {
      this.assistantItem(event.item.id, event.response_id);
    } else if (event.item?.type === "function_call") {
      this.ui.tool(event.item.call_id, event.item.name, null); // arguments still streaming
    }
  },

  "response.output_item.done"(event) {
    if (event.item?.type === "function_call") {
      this.ui.tool(event.item.call_id, event.item.name, event.item.arguments);
    }
  },

  // The relay's function_call_output item, as the server confirms it (GA: added, then done).
  "conversation.item.added"(event) {
    this.onToolOutput(event.item);
  },

  "conversation.item.done"(event) {
    this.onToolOutput(event.item);
  },

  "response.output_audio.delta"(event) {
    this.audioItem = event.item_id;
    if (this.interrupted.has(event.response_id) || this.interrupted.has(event.item_id)) {
      this.stats.droppedDeltas++; // late audio of an interrupted response (§12.4): dropped
      this.audioItem = null; // with its frames, also before the item itself is marked interrupted
      return;
    }
    const item = this.assistantItem(event.item_id, event.response_id);
    if (event.relay_audio) {
      item.received += event.relay_audio.samples; // its frames follow as binary messages
    } else if (event.delta) {
      // Plain JSON audio (a relay without binary output): base64 PCM16 24 kHz.
      const bytes = Uint8Array.from(atob(event.delta), (c) => c.charCodeAt(0));
      item.received += bytes.length >> 1;
      this.player.push(event.item_id, bytes);
    }
    this.stats.samplesReceived += event.relay_audio?.samples ?? 0;
    this.publish(event.item_id);
  },

  "response.output_audio.done"(event) {
    this.audioItem = event.item_id;
    if (!this.interrupted.has(event.item_id)) this.endAfterFrames = event.item_id;
  },

  "response.output_audio_transcript.delta"(event) {
    if (this.interrupted.has(event.response_id)) return; // unheard text of an interrupted answer
    const text = (this.assistantText.get(event.item_id) || "") + event.delta;
    this.assistantText.set(event.item_id, text);
    this.ui.assistant(event.item_id, text, false);
  },

  "response.output_audio_transcript.done"(event) {
    if (this.interrupted.has(event.response_id)) return;
    this.assistantText.set(event.item_id, event.transcript);
    this.ui.assistant(event.item_id, event.transcript, true);
  },

  "response.output_text.delta"(event) {
    Session.prototype.handlers["response.output_audio_transcript.delta"].call(this, event);
  },

  "response.output_text.done"(event) {
    this.ui.assistant(event.item_id, event.text, true);
  },

  "response.done"(event) {
    if (this.activeResponse === event.response.id || this.activeResponse === "pending") {
      this.activeResponse = null;
    }
    if (this.wantResponse) {
      this.wantResponse = false;
      this.requestResponse();
    }
  },
};

// -- captions: a transcription session ------------------------------------------------------------

/**
 * Live captions of the microphone: `/ws?intent=transcription`, no model, no output audio. The
 * relay injects the transcription session and the page never updates it, so turn taking is the
 * tier's (`options.turn_detection`): server VAD, or push-to-talk with a commit per turn. Each
 * turn (item) is reported as `ui.caption(itemId, text, status, detail)`, status "partial" (the
 * deltas so far), "final" (the completed transcript) or "failed" (`detail`: why).
 */
export class Captions extends Session {
  constructor(o) {
    super(o);
    this.outputCodec = this.stats.outputCodec = null;
    this.speaking = false; // between speech_started and speech_stopped (server VAD)
  }

  openPlayer() {
    return null; // nothing is played
  }

  query() {
    return new URLSearchParams({ intent: "transcription" });
  }

  setMode(mode) {
    this.mode = mode; // the page offers only the tier's own turn taking here
  }

  setVoice() {}

  beforeTalk() {} // nothing is being said to interrupt

  afterCommit() {
    this.ui.state("transcribing"); // no response.create: nothing answers
  }

  /** Back to "listening" once nobody is talking (a transcript may arrive mid-way the next turn). */
  settle() {
    if (!this.speaking && !this.talking) this.ui.state("listening");
  }
}

Captions.prototype.handlers = {
  error: Session.prototype.onError,

  "session.created"() {
    this.live = true;
    this.ui.state("listening");
  },

  "input_audio_buffer.speech_started"(event) {
    this.speaking = true;
    this.ui.caption(event.item_id, this.userText.get(event.item_id) || "", "partial");
    this.ui.state("user");
  },

  "input_audio_buffer.speech_stopped"() {
    this.speaking = false;
    this.ui.state("transcribing");
  },

  "input_audio_buffer.committed"(event) {
    this.ui.caption(event.item_id, this.userText.get(event.item_id) || "", "partial");
  },

  "conversation.item.input_audio_transcription.delta"(event) {
    const text = (this.userText.get(event.item_id) || "") + (event.delta || "");
    this.userText.set(event.item_id, text);
    this.ui.caption(event.item_id, text, "partial");
  },

  "conversation.item.input_audio_transcription.completed"(event) {
    this.userText.delete(event.item_id);
    this.ui.caption(event.item_id, event.transcript || "", "final");
    this.settle();
  },

  "conversation.item.input_audio_transcription.failed"(event) {
    const text = this.userText.get(event.item_id) || "";
    this.userText.delete(event.item_id);
    this.ui.caption(event.item_id, text, "failed", event.error?.message || "");
    this.settle();
  },
};

// -- calls: the conversation over WebRTC ----------------------------------------------------------

const CALLS_PATH = "/v1/realtime/calls"; // the relay's, as OpenAI's (README "WebRTC calls")
const HANGUP_TIMEOUT_MS = 2000; // the longest a hung-up call's peer connection waits for the relay

/**
 * A conversation over WebRTC (https://developers.openai.com/api/docs/guides/realtime-webrtc):
 * the SDP offer goes to the relay, which admits the call as it admits /ws, creates it upstream
 * with the server's session and answers with the SDP answer; the microphone track and the
 * `oai-events` data channel then go to the voice service directly. The data channel carries the
 * events of /ws but no output audio: the answer plays from the remote track in an
 * `<audio autoplay>` element, and `output_audio_buffer.started/stopped/cleared` say when. On an
 * interruption the server truncates the item to what it played itself; the page only cancels.
 */
export class Call extends Session {
  constructor(o) {
    super(o);
    this.inputCodec = this.outputCodec = null; // the browser's WebRTC stack chooses (Opus)
    Object.assign(this.stats, { transport: "webrtc", inputCodec: null, outputCodec: null });
    this.pc = this.channel = this.track = this.location = null;
    this.playing = null; // the response whose audio the server is sending on the track
    this.speaker = document.createElement("audio");
    this.speaker.autoplay = true;
  }

  async connect() {
    this.ui.state("connecting");
    // The capture worklet only feeds the level meter (and times push-to-talk): the peer
    // connection sends a clone of the track, muted while push-to-talk is not held.
    const mic = await Microphone.open(this.ctx, (samples, rms) => this.onMic(samples, rms));
    if (this.closed) return mic.close();
    this.mic = mic;
    this.track = mic.stream.getAudioTracks()[0].clone();
    this.gate();
    const pc = (this.pc = new RTCPeerConnection());
    pc.ontrack = (event) => {
      this.speaker.srcObject = event.streams[0] || new MediaStream([event.track]);
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState !== "failed") return;
      this.hangUp(); // the relay would otherwise hold the lost call until its idle timeout
      this.end(describeCallEnd(true));
    };
    pc.addTrack(this.track);
    this.channel = pc.createDataChannel("oai-events");
    this.channel.onmessage = (event) => this.onMessage(event.data);
    this.channel.onclose = () => this.end(describeCallEnd(false));
    // The offer goes at once, without waiting for ICE gathering (as agents-js posts it): the
    // answerer learns the page's addresses from its connectivity checks.
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    const url = new URL(CALLS_PATH, location.href);
    if (this.model) url.searchParams.set("model", this.model); // else the tier's default model
    const request = { method: "POST", body: offer.sdp, headers: this.headers("application/sdp") };
    let response;
    try {
      response = await fetch(url, request);
    } catch {
      return this.end("The relay cannot be reached.");
    }
    if (response.ok) this.location = new URL(response.headers.get("Location"), url);
    if (this.closed) return this.hangUp(); // the user hung up while the offer was out
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      const { code, message } = body.error || {};
      this.refusal = { code, message: message || `The relay answered ${response.status}.` };
      return this.end();
    }
    await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  }

  /** The credential, as the page gives /ws its own (none: the anonymous tier). */
  headers(contentType) {
    const headers = contentType ? { "Content-Type": contentType } : {};
    // As new WebSocket() refuses such a key for /ws (fetch would fail with a TypeError).
    if (!/^[\x20-\x7e]*$/.test(this.key)) throw new DOMException("The key cannot be sent.", "SyntaxError");
    if (this.key) headers.Authorization = `Bearer ${this.key}`;
    return headers;
  }

  /**
   * Hang up (the user's choice). The relay hears it first, so that it ends the call as the
   * caller's and frees its slot at once; the peer connection, silent by then, closes once the
   * relay has answered (or after HANGUP_TIMEOUT_MS).
   */
  close() {
    const pc = this.pc;
    const hungUp = this.hangUp();
    this.pc = null; // not closed by cleanup()
    this.cleanup();
    if (!pc) return;
    pc.onconnectionstatechange = null;
    const late = new Promise((resolve) => setTimeout(resolve, HANGUP_TIMEOUT_MS));
    Promise.race([hungUp, late]).then(() => pc.close());
  }

  /** `POST /v1/realtime/calls/{id}/hangup` on the relay, once; resolves when it answered. */
  hangUp() {
    if (!this.location) return Promise.resolve();
    const url = `${this.location}/hangup`;
    this.location = null;
    return fetch(url, { method: "POST", headers: this.headers(), keepalive: true }).catch(() => {});
  }

  cleanup() {
    if (this.closed) return;
    if (this.channel) this.channel.onclose = this.channel.onmessage = null;
    if (this.pc) this.pc.onconnectionstatechange = null;
    this.pc?.close();
    this.track?.stop();
    this.speaker.srcObject = null;
    super.cleanup();
  }

  /** The call ended by itself (the relay or the voice service hung up, or the network). */
  end(otherwise) {
    if (this.closed) return;
    this.location = null; // ended (or never made): nothing left to hang up
    super.end(otherwise);
  }

  transmit(message) {
    if (this.channel?.readyState !== "open") return;
    try {
      this.channel.send(message);
    } catch {
      this.ui.error(describe("message_too_big")); // past the channel's largest message
    }
  }

  onMic(samples, rms) {
    this.ui.level(rms);
    if (this.talking) this.talkMs += (samples.length * 1000) / this.ctx.sampleRate;
  }

  /** Send the microphone only while it may be heard: always, or while push-to-talk is held. */
  gate() {
    if (this.track) this.track.enabled = this.mode !== "ptt" || this.talking;
  }

  setMode(mode) {
    super.setMode(mode);
    this.gate();
  }

  press() {
    super.press();
    this.gate();
  }

  release() {
    super.release();
    this.gate();
  }

  /**
   * Stop the answer: cancel the response still being written, and clear the audio the server
   * still has to play (`output_audio_buffer.clear`, WebRTC's own event); the server truncates
   * the item to what was played. With server VAD a barge-in needs none of it (`cancel` false).
   */
  interrupt(cancel) {
    if (!cancel) return;
    const response = this.activeResponse;
    if (response && response !== "pending") this.send({ type: "response.cancel" });
    if (this.playing) this.send({ type: "output_audio_buffer.clear" });
  }

  itemsOf(responseId) {
    return [...this.items].filter(([, item]) => item.response === responseId).map(([itemId]) => itemId);
  }
}

Call.prototype.handlers = {
  ...Session.prototype.handlers,

  // Never sent over WebRTC (the audio is on the track); ignored if they were.
  "response.output_audio.delta"() {},
  "response.output_audio.done"() {},

  "output_audio_buffer.started"(event) {
    this.playing = event.response_id;
    if (this.turnEnd !== null) {
      // End of the user's turn -> the server starts the answer's audio (the network and the
      // browser's jitter buffer add a few tens of milliseconds before it is heard).
      const ms = performance.now() - this.turnEnd;
      this.turnEnd = null;
      this.stats.latencies.push(Math.round(ms));
      const [itemId] = this.itemsOf(event.response_id);
      if (itemId) this.ui.latency(itemId, ms);
    }
    if (!this.talking) this.ui.state("speaking");
  },

  "output_audio_buffer.stopped"() {
    this.playing = null;
    if (!this.talking && this.turnEnd === null) this.ui.state("listening");
  },

  // After an interruption, which shows its own state.
  "output_audio_buffer.cleared"(event) {
    this.playing = null;
    this.interrupted.add(event.response_id); // its transcript's late deltas are not shown
    for (const itemId of this.itemsOf(event.response_id)) this.ui.interrupted(itemId);
  },

  "response.done"(event) {
    Session.prototype.handlers["response.done"].call(this, event);
    // A response with no audio (text, a tool call) never starts the output buffer.
    if (!this.playing && !this.talking && !this.activeResponse) this.ui.state("listening");
  },
};
