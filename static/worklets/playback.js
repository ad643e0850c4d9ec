// Playback worklet: a ring buffer of assistant audio at the *source* rate (24 kHz PCM from the
// relay, 48 kHz from the Opus decoder), resampled to the context rate as it is rendered. We
// never rely on AudioContext({sampleRate: 24000}): Firefox cannot open one on a 48 kHz device.
//
// It keeps track of which conversation item each stored sample belongs to, so the page knows
// how much of an item was actually played when the user interrupts (conversation.item.truncate
// wants the milliseconds heard, REALTIME.md §12.4).
//
// Messages in:  {type: "config", sourceRate}, {type: "audio", itemId, samples: Float32Array},
//               {type: "end", itemId} (no more audio for that item), {type: "flush"}.
// Messages out: {type: "started", itemId}, {type: "stats", ...}, {type: "idle"},
//               {type: "flushed", itemId, played, buffered} (played/buffered in source samples).

const PREBUFFER_SECONDS = 0.05; // jitter cushion before a new burst starts playing
const STATS_EVERY = 8; // render quanta between stats messages (~21 ms at 48 kHz)

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.sourceRate = 24000;
    this.ring = new Float32Array(1 << 19); // ~22 s at 24 kHz; grows when a burst needs more
    this.write = 0; // absolute index of the next sample to store
    this.pos = 0; // absolute (fractional) read position, in source samples
    this.segments = []; // [{itemId, start, end, ended}] in order, absolute indices
    this.playing = false;
    this.startedItem = null;
    this.played = 0; // source samples rendered in total (flushed ones are not counted)
    this.underruns = 0; // times the buffer ran dry in the middle of an item: audible gaps
    this.quanta = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(message) {
    switch (message.type) {
      case "config":
        this.sourceRate = message.sourceRate;
        break;
      case "audio":
        this.append(message.itemId, message.samples);
        break;
      case "end": {
        const segment = this.segments.find((s) => s.itemId === message.itemId);
        if (segment) segment.ended = true;
        break;
      }
      case "flush":
        this.flush();
        break;
    }
  }

  append(itemId, samples) {
    const needed = this.write + samples.length - Math.floor(this.pos);
    if (needed > this.ring.length) this.grow(needed);
    const mask = this.ring.length - 1;
    for (let i = 0; i < samples.length; i++) this.ring[(this.write + i) & mask] = samples[i];
    const last = this.segments[this.segments.length - 1];
    if (last && last.itemId === itemId && last.end === this.write) {
      last.end += samples.length;
    } else {
      this.segments.push({ itemId, start: this.write, end: this.write + samples.length, ended: false });
    }
    this.write += samples.length;
  }

  grow(needed) {
    let size = this.ring.length;
    while (size < needed) size *= 2;
    const ring = new Float32Array(size);
    const oldMask = this.ring.length - 1;
    for (let i = Math.floor(this.pos); i < this.write; i++) ring[i & (size - 1)] = this.ring[i & oldMask];
    this.ring = ring;
  }

  // The segment holding the sample at `index` (or the last one before it).
  segmentAt(index) {
    let found = null;
    for (const segment of this.segments) {
      if (segment.start <= index) found = segment;
      else break;
    }
    return found;
  }

  playedOf(segment) {
    return Math.max(0, Math.min(Math.floor(this.pos), segment.end) - segment.start);
  }

  flush() {
    const segment = this.segmentAt(Math.floor(this.pos));
    this.port.postMessage({
      type: "flushed",
      itemId: segment ? segment.itemId : null,
      played: segment ? this.playedOf(segment) : 0,
      buffered: this.write - Math.floor(this.pos),
    });
    this.pos = this.write;
    this.segments = [];
    this.playing = false;
    this.startedItem = null;
    this.postStats();
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    const buffered = this.write - this.pos;
    if (!this.playing && buffered > 0) {
      const last = this.segments[this.segments.length - 1];
      // Start once the cushion is there, or at once when the item's audio is complete.
      this.playing = buffered >= PREBUFFER_SECONDS * this.sourceRate || (last && last.ended);
    }
    if (this.playing) this.render(out);
    else out.fill(0);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (++this.quanta % STATS_EVERY === 0 && this.segments.length) this.postStats();
    return true;
  }

  render(out) {
    // Linear interpolation: plenty for speech, and cheap enough for the audio thread.
    const step = this.sourceRate / sampleRate;
    const mask = this.ring.length - 1;
    const before = this.pos;
    let frame = 0;
    const segment = this.segmentAt(Math.floor(this.pos));
    if (segment && segment.itemId !== this.startedItem) {
      this.startedItem = segment.itemId;
      this.port.postMessage({ type: "started", itemId: segment.itemId });
    }
    for (; frame < out.length; frame++) {
      const index = Math.floor(this.pos);
      if (index >= this.write) break;
      const frac = this.pos - index;
      const s0 = this.ring[index & mask];
      const s1 = index + 1 < this.write ? this.ring[(index + 1) & mask] : s0;
      out[frame] = s0 + (s1 - s0) * frac;
      this.pos = Math.min(this.pos + step, this.write);
    }
    out.fill(0, frame);
    this.played += this.pos - before;
    if (this.pos >= this.write) {
      this.playing = false;
      const last = this.segments[this.segments.length - 1];
      if (last && !last.ended) this.underruns++;
      this.postStats();
      if (!last || last.ended) {
        this.segments = [];
        this.startedItem = null;
        this.port.postMessage({ type: "idle" });
      }
    }
  }

  postStats() {
    this.port.postMessage({
      type: "stats",
      played: Math.round(this.played),
      buffered: this.write - Math.floor(this.pos),
      underruns: this.underruns,
      items: this.segments.map((s) => ({ itemId: s.itemId, played: this.playedOf(s) })),
    });
    // Items played to their end and followed by another are final in the message just sent.
    while (this.segments.length > 1 && this.playedOf(this.segments[0]) === this.segments[0].end - this.segments[0].start) {
      this.segments.shift();
    }
  }
}

registerProcessor("playback", PlaybackProcessor);
