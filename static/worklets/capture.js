// Microphone capture worklet: collects the context's 128-frame render quanta into 20 ms chunks
// at the device rate and posts each chunk (Float32, transferred) with its RMS level. The main
// thread converts chunks to what the relay takes (PCM16 frames or Opus packets, see audio.js).

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    // `sampleRate` is a global of the worklet scope: the AudioContext's rate (44.1 or 48 kHz...).
    this.size = Math.round(sampleRate / 50); // 20 ms
    this.chunk = new Float32Array(this.size);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true; // no input yet (the stream is still starting): keep running
    let offset = 0;
    while (offset < channel.length) {
      const count = Math.min(channel.length - offset, this.size - this.filled);
      this.chunk.set(channel.subarray(offset, offset + count), this.filled);
      this.filled += count;
      offset += count;
      if (this.filled === this.size) this.post();
    }
    return true;
  }

  post() {
    let sum = 0;
    for (const value of this.chunk) sum += value * value;
    const rms = Math.sqrt(sum / this.size);
    this.port.postMessage({ samples: this.chunk, rms }, [this.chunk.buffer]);
    this.chunk = new Float32Array(this.size);
    this.filled = 0;
  }
}

registerProcessor("capture", CaptureProcessor);
