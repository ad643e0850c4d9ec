"""Audio: codecs (PCM16 resampling, G.711, Opus) and the binary-frame wire format of `/ws`."""
