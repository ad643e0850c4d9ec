// Audio in and out of the browser, in the relay's binary wire format (app/wire.py):
// 0x01 + one input frame (PCM16 LE at the declared rate, or one raw Opus packet) goes up,
// 0x02 + one output frame (PCM16 LE 24 kHz, or one 20 ms Opus packet) comes down.

export const AUDIO_IN = 0x01;
export const AUDIO_OUT = 0x02;
const OPUS_RATES = [8000, 12000, 16000, 24000, 48000]; // what the relay's Opus decoder takes
const OPUS_CONFIG = { codec: "opus", numberOfChannels: 1 };

/** Load both worklets into `ctx` (once per context). */
export async function loadWorklets(ctx) {
  const base = new URL("../worklets/", import.meta.url);
  await ctx.audioWorklet.addModule(new URL("capture.js", base));
  await ctx.audioWorklet.addModule(new URL("playback.js", base));
}

/**
 * The `input_rate` to declare for Opus from a `rate` encoder. Opus packets decode at any rate,
 * and the relay only checks the value is an Opus rate; browsers that encode from 44.1 kHz
 * resample inside the encoder, so 48 kHz is the honest figure then.
 */
export function opusWireRate(rate) {
  return OPUS_RATES.includes(rate) ? rate : 48000;
}

/** Whether WebCodecs can encode Opus at `rate` and decode it at 48 kHz in this browser. */
export async function opusSupport(rate) {
  const result = { input: false, output: false };
  try {
    if ("AudioEncoder" in window) {
      const config = { ...OPUS_CONFIG, sampleRate: rate, bitrate: 32000 };
      result.input = (await AudioEncoder.isConfigSupported(config)).supported === true;
    }
    if ("AudioDecoder" in window) {
      const config = { ...OPUS_CONFIG, sampleRate: 48000 };
      result.output = (await AudioDecoder.isConfigSupported(config)).supported === true;
    }
  } catch {
    // Older WebCodecs builds throw on unknown codecs: PCM it is.
  }
  return result;
}

/** The microphone through the capture worklet: calls `onChunk(float32, rms)` every 20 ms. */
export class Microphone {
  static async open(ctx, onChunk) {
    const stream = await navigator.mediaDevices.getUserMedia({
      // Echo cancellation keeps the assistant's voice from the speakers out of the microphone,
      // which would otherwise interrupt it (server VAD hears it as the user). Automatic gain
      // control stays off: Chromium's pumps the level and clips (measured in tests/test_page.py:
      // the envelope correlation with the spoken file drops from ~0.95-0.99 to ~0.85).
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: false },
    });
    const source = ctx.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(ctx, "capture", { numberOfInputs: 1, numberOfOutputs: 1 });
    // A silent path to the destination keeps the node pulled by the graph in every browser.
    const mute = new GainNode(ctx, { gain: 0 });
    source.connect(node).connect(mute).connect(ctx.destination);
    node.port.onmessage = (event) => onChunk(event.data.samples, event.data.rms);
    return new Microphone(stream, source, node, mute);
  }

  constructor(stream, source, node, mute) {
    Object.assign(this, { stream, source, node, mute });
  }

  close() {
    this.node.port.onmessage = null;
    this.source.disconnect();
    this.node.disconnect();
    this.mute.disconnect();
    for (const track of this.stream.getTracks()) track.stop();
  }
}

/** Float samples at the context rate -> 0x01 frames of PCM16 LE (the relay resamples). */
export class Pcm16Encoder {
  constructor(send) {
    this.send = send;
  }

  encode(samples) {
    const frame = new DataView(new ArrayBuffer(1 + samples.length * 2));
    frame.setUint8(0, AUDIO_IN);
    for (let i = 0; i < samples.length; i++) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      frame.setInt16(1 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
    }
    this.send(frame.buffer);
  }

  close() {}
}

/** Float samples -> 0x01 frames, one raw 20 ms Opus packet each (WebCodecs AudioEncoder). */
export class OpusEncoder {
  constructor(send, rate) {
    this.rate = rate;
    this.timestamp = 0; // microseconds
    this.encoder = new AudioEncoder({
      output: (chunk) => {
        const frame = new Uint8Array(1 + chunk.byteLength);
        frame[0] = AUDIO_IN;
        chunk.copyTo(frame.subarray(1));
        send(frame.buffer);
      },
      error: (error) => console.warn("Opus encoder:", error),
    });
    this.encoder.configure({
      ...OPUS_CONFIG,
      sampleRate: rate,
      bitrate: 32000,
      opus: { frameDuration: 20000 },
    });
  }

  encode(samples) {
    const data = new AudioData({
      format: "f32-planar",
      sampleRate: this.rate,
      numberOfChannels: 1,
      numberOfFrames: samples.length,
      timestamp: this.timestamp,
      data: samples,
    });
    this.timestamp += (samples.length * 1e6) / this.rate;
    this.encoder.encode(data);
    data.close();
  }

  close() {
    if (this.encoder.state !== "closed") this.encoder.close();
  }
}

/**
 * Assistant audio out: decodes 0x02 frames and feeds the playback worklet (worklets/playback.js),
 * which resamples to the context rate and counts what was played per conversation item.
 */
export class Player {
  static async create(ctx, codec, onMessage) {
    const node = new AudioWorkletNode(ctx, "playback", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
    });
    node.connect(ctx.destination);
    return new Player(node, codec, onMessage);
  }

  constructor(node, codec, onMessage) {
    this.node = node;
    this.codec = codec;
    this.sourceRate = codec === "opus" ? 48000 : 24000;
    this.generation = 0; // bumped by flush(): decoder output of older audio is dropped
    this.waiting = []; // resolves of pending flush() promises, in order
    node.port.onmessage = (event) => {
      if (event.data.type === "flushed") {
        this.waiting.shift()?.(event.data);
      } else {
        onMessage(event.data);
      }
    };
    node.port.postMessage({ type: "config", sourceRate: this.sourceRate });
    if (codec === "opus") this.openDecoder();
  }

  openDecoder() {
    this.pending = []; // [itemId, generation] per packet, in decode order
    this.timestamp = 0;
    this.decoder = new AudioDecoder({
      output: (data) => {
        const [itemId, generation] = this.pending.shift() || [];
        const samples = new Float32Array(data.numberOfFrames);
        data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
        data.close();
        if (generation === this.generation) this.post(itemId, samples);
      },
      error: (error) => console.warn("Opus decoder:", error),
    });
    this.decoder.configure({ ...OPUS_CONFIG, sampleRate: 48000 });
  }

  /** One 0x02 frame's payload (without the type byte) for conversation item `itemId`. */
  push(itemId, payload) {
    if (this.codec === "opus") {
      this.pending.push([itemId, this.generation]);
      this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.timestamp, data: payload }));
      this.timestamp += 20000;
      return;
    }
    const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
    const samples = new Float32Array(payload.byteLength >> 1);
    for (let i = 0; i < samples.length; i++) samples[i] = view.getInt16(i * 2, true) / 0x8000;
    this.post(itemId, samples);
  }

  post(itemId, samples) {
    this.node.port.postMessage({ type: "audio", itemId, samples }, [samples.buffer]);
  }

  /** No more audio will come for `itemId`: the worklet may play its last few milliseconds. */
  async end(itemId) {
    const generation = this.generation;
    if (this.codec === "opus" && this.decoder.state === "configured") await this.decoder.flush();
    if (generation === this.generation) this.node.port.postMessage({ type: "end", itemId });
  }

  /** Stop at once; resolves to {itemId, played, buffered} in source samples. */
  flush() {
    this.generation++;
    return new Promise((resolve) => {
      this.waiting.push(resolve);
      this.node.port.postMessage({ type: "flush" });
    });
  }

  /** Source samples -> milliseconds. */
  ms(samples) {
    return (samples * 1000) / this.sourceRate;
  }

  close() {
    this.node.port.onmessage = null;
    this.node.disconnect();
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
  }
}
