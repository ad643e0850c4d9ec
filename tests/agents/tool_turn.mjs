// One turn of an unmodified @openai/agents RealtimeSession (WebSocket transport, Node) through the
// relay, in which the model calls a server tool the relay runs itself. Used by
// tests/test_agents.py:
//
//   node tests/agents/tool_turn.mjs ws://127.0.0.1:PORT/v1/realtime "TEXT" [--model=NAME]
//
// The client key comes from the environment (RELAY_TEST_CLIENT_KEY), not the command line. The
// agent has no tools of its own. It sends TEXT as a user message, waits for the answer (the
// first response.done that carries an assistant message), lingers a moment for stray events, and
// prints one JSON line: every server event it saw (audio deltas shortened to their length), the
// session's errors, the tool events of the session, the answer's text or transcript, and the
// history. Exits 0; 1 on failure (the reason and what was seen so far on stderr), 2 for bad
// arguments.

import { RealtimeAgent, RealtimeSession } from "@openai/agents/realtime";

const DEADLINE_MS = 30_000; // the whole run (tests/test_agents.py waits 45 s)
const LINGER_MS = 500; // after the answer, for events that would arrive late (a second response)
const USAGE = 'usage: RELAY_TEST_CLIENT_KEY=KEY node tool_turn.mjs WS_URL "TEXT" [--model=NAME]';

const [url, text, ...rest] = process.argv.slice(2);
const flags = Object.fromEntries(rest.map((arg) => arg.replace(/^--/, "").split("=", 2)));
const apiKey = process.env.RELAY_TEST_CLIENT_KEY;
if (!url || !text || !apiKey) {
  console.error(USAGE);
  process.exit(2);
}

const seen = {
  events: [], // server events as the transport parsed them (audio shortened)
  errors: [], // the session's `error` emissions
  toolEvents: [], // agent_tool_start / agent_tool_end / tool_approval_requested
  answer: "", // the assistant's text or transcript
  history: [],
};

/** A JSON-safe copy of an `error` emission: Errors lose their fields to JSON.stringify. */
function plainError(value) {
  if (value instanceof Error) return { name: value.name, message: value.message };
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([key, inner]) => [key, plainError(inner)]));
  }
  return value;
}

function shortened(event) {
  if (typeof event?.delta === "string" && event.type?.includes("audio")) {
    return { ...event, delta: `<${event.delta.length} base64 chars>` };
  }
  return event;
}

const agent = new RealtimeAgent({
  name: "Relay test agent",
  instructions: "AGENT INSTRUCTIONS: answer briefly.",
  voice: "cedar",
});
const session = new RealtimeSession(agent, {
  transport: "websocket",
  model: flags.model ?? "gpt-realtime-mini",
});

let answered;
const answer = new Promise((resolve) => {
  answered = resolve;
});
session.on("transport_event", (event) => {
  seen.events.push(shortened(event));
  if (event.type === "response.output_audio_transcript.done") seen.answer ||= event.transcript ?? "";
  if (event.type === "response.output_text.done") seen.answer ||= event.text ?? "";
  if (event.type === "response.done") {
    const output = event.response?.output ?? [];
    if (output.some((item) => item.type === "message" && item.role === "assistant")) answered();
  }
});
session.on("error", (error) => seen.errors.push(plainError(error)));
for (const name of ["agent_tool_start", "agent_tool_end", "tool_approval_requested"]) {
  session.on(name, (...args) => {
    const tool = args.find((arg) => arg && typeof arg === "object" && "name" in arg);
    seen.toolEvents.push({ event: name, tool: tool?.name ?? null });
  });
}
session.on("history_updated", (history) => {
  seen.history = history;
});

const deadline = new Promise((_, reject) => {
  setTimeout(() => reject(new Error(`no answer within ${DEADLINE_MS} ms`)), DEADLINE_MS).unref();
});

async function run() {
  await session.connect({ apiKey, url });
  session.sendMessage(text);
  await answer;
  await new Promise((resolve) => setTimeout(resolve, LINGER_MS));
}

try {
  await Promise.race([run(), deadline]);
} catch (error) {
  console.error(`tool_turn.mjs: ${error?.stack || error}`);
  console.error(JSON.stringify(seen));
  session.close();
  process.exit(1);
}
session.close();
if (!seen.answer) {
  // Not from an event: the history's last assistant message (audio transcript or text).
  const messages = seen.history.filter((item) => item.type === "message" && item.role === "assistant");
  const parts = messages.at(-1)?.content ?? [];
  seen.answer = parts.map((part) => part.transcript ?? part.text ?? "").join("");
}
console.log(JSON.stringify(seen));
process.exit(0);
