// One scripted audio turn through the relay with one of openai-node's Realtime clients.
//
//   node realtime_turn.mjs websocket|ws <base URL, e.g. https://127.0.0.1:8443/v1> [speech.pcm]
//
// `websocket` is OpenAIRealtimeWebSocket (the runtime's native WebSocket: Node >= 22), `ws` is
// OpenAIRealtimeWS (the `ws` package). Both connect only to wss:// URLs, built from the base URL
// as the SDK builds them for OpenAI (https -> wss, + /realtime?model=...). The relay's
// self-signed certificate is trusted through NODE_EXTRA_CA_CERTS, as a user would do it.
// The client key comes from RELAY_TEST_CLIENT_KEY. The turn: push-to-talk, 0.4 s of a PCM16
// tone and 0.2 s of silence in 20 ms appends, commit, response.create, wait for response.done.
// With a file of PCM16 24 kHz speech, a transcription session instead (`intent: 'transcription'`):
// the speech in 20 ms appends, then wait for the first completed transcription (`transcript`).
// Prints one JSON line (also when the turn failed: `ok` false and `error`); exits 1 only when
// it could not report.
import { readFileSync } from 'node:fs';
import OpenAI from 'openai';
import { OpenAIRealtimeWebSocket } from 'openai/realtime/websocket';
import { OpenAIRealtimeWS } from 'openai/realtime/ws';

const [kind, baseURL, speechFile] = process.argv.slice(2);
const TIMEOUT_MS = 20_000;
const RATE = 24_000;

function tone(ms, freq = 300, amplitude = 8000) {
  const samples = new Int16Array((RATE * ms) / 1000);
  for (let i = 0; i < samples.length; i++) {
    samples[i] = Math.trunc(amplitude * Math.sin((2 * Math.PI * freq * i) / RATE));
  }
  return Buffer.from(samples.buffer);
}

const audio = speechFile
  ? readFileSync(speechFile)
  : Buffer.concat([tone(400), Buffer.alloc((RATE * 2 * 200) / 1000)]);
const summary = {
  client: kind,
  node: process.versions.node,
  openai: OpenAI.VERSION,
  ok: false,
  url: null,
  types: [],
  errors: [],
  sentBytes: audio.length,
  echoedBytes: 0,
  echoed: false,
  usage: null,
  status: null,
  transcript: null,
  error: null,
};

function report(code = 0) {
  process.stdout.write(JSON.stringify(summary) + '\n');
  process.exit(code);
}

async function turn() {
  const client = new OpenAI({ apiKey: process.env.RELAY_TEST_CLIENT_KEY, baseURL, maxRetries: 0 });
  const props = speechFile ? { intent: 'transcription' } : { model: 'gpt-realtime-mini' };
  let rt;
  if (kind === 'websocket') {
    rt = new OpenAIRealtimeWebSocket(props, client);
  } else if (kind === 'ws') {
    rt = new OpenAIRealtimeWS(props, client);
  } else {
    throw new Error(`unknown client ${kind}`);
  }
  summary.url = String(rt.url);
  const deltas = [];
  let opened = false;
  const done = new Promise((resolve, reject) => {
    rt.on('error', (error) => {
      summary.errors.push({ message: error.message, code: error.error?.code ?? null });
      // Before the socket opened, nothing else will come: a refused certificate ends here.
      if (!opened) reject(new Error(`${error.message} ${error.cause?.message ?? ''}`.trim()));
    });
    rt.on('event', (event) => {
      summary.types.push(event.type);
      if (event.type === 'response.output_audio.delta') {
        deltas.push(Buffer.from(event.delta, 'base64'));
      } else if (event.type === 'response.done') {
        summary.status = event.response.status;
        summary.usage = event.response.usage ?? null;
        resolve();
      } else if (
        speechFile &&
        event.type === 'conversation.item.input_audio_transcription.completed'
      ) {
        summary.transcript = event.transcript;
        summary.usage = event.usage ?? null;
        resolve();
      }
    });
    const closed = (code) => reject(new Error(`closed with ${code} before response.done`));
    if (kind === 'websocket') {
      rt.socket.addEventListener('close', (event) => closed(event.code));
    } else {
      rt.socket.on('close', closed);
    }
  });
  const open = new Promise((resolve, reject) => {
    const onOpen = () => {
      opened = true;
      resolve();
    };
    if (kind === 'websocket') {
      rt.socket.addEventListener('open', onOpen);
    } else {
      rt.socket.on('open', onOpen);
    }
    done.catch(reject);
  });
  await open;

  if (!speechFile) {
    const session = { type: 'realtime', audio: { input: { turn_detection: null } } };
    rt.send({ type: 'session.update', session });
  }
  for (let offset = 0; offset < audio.length; offset += 960) {
    const chunk = audio.subarray(offset, offset + 960);
    rt.send({ type: 'input_audio_buffer.append', audio: chunk.toString('base64') });
  }
  if (speechFile) {
    await done;
    summary.ok = summary.errors.length === 0 && Boolean(summary.transcript);
    rt.close();
    return;
  }
  rt.send({ type: 'input_audio_buffer.commit' });
  rt.send({ type: 'response.create' });
  await done;

  const echoed = Buffer.concat(deltas);
  summary.echoedBytes = echoed.length;
  summary.echoed = Buffer.compare(echoed, audio) === 0; // the local upstream echoes the audio
  summary.ok = summary.status === 'completed' && summary.errors.length === 0;
  rt.close();
}

const timer = setTimeout(() => {
  summary.error = `no response.done within ${TIMEOUT_MS} ms`;
  report();
}, TIMEOUT_MS);

turn().then(
  () => {
    clearTimeout(timer);
    report();
  },
  (error) => {
    clearTimeout(timer);
    summary.error = String(error?.message ?? error);
    report();
  },
);
