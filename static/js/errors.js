// The relay's error codes (app/errors.py, plus the upstream's own, REALTIME.md §10) in plain words.

const PLAIN = {
  unauthorized:
    "This relay did not accept the key (or it does not allow anonymous use). Paste a valid client key and connect again.",
  session_limit_reached:
    "Too many conversations are open right now: the limit for your access level is reached. Try again in a minute.",
  // Also a refused Captions session, whose transcription model the page does not choose.
  model_not_allowed: "The model this session needs is not available with your access level.",
  origin_not_allowed: "This relay does not accept connections from this web address.",
  unsupported_protocol: "This client speaks a protocol version the relay does not support.",
  limiter_unavailable:
    "The relay cannot check its usage limits right now, so it is not starting new conversations. Try again shortly.",
  server_shutting_down: "The relay is restarting. Connect again in a moment.",
  upstream_unavailable: "The relay could not reach the voice service. Try again shortly.",
  upstream_unauthorized:
    "The voice service refused the relay's own API key. The relay's operator needs to fix it.",
  upstream_rate_limited: "The voice service is busy (rate limited). Wait a little and try again.",
  upstream_refused: "The voice service refused the connection.",
  upstream_closed: "The voice service ended the conversation.",
  session_expired: "The conversation reached its time limit.",
  session_idle: "The conversation was closed after being idle.",
  message_too_big: "A message was too large for the relay (try a smaller image).",
  field_locked: "That setting is fixed by the relay for your access level.",
  invalid_audio: "The relay could not decode some microphone audio.",
  invalid_event: "The relay rejected a message from this page.",
  invalid_json: "The relay rejected a message from this page.",
  unknown_event_type: "The relay rejected a message from this page.",
  relay_error: "The relay hit an internal error.",
  input_audio_buffer_commit_empty: "Nothing was recorded: hold the talk button a little longer.",
};

// Errors that mean "you cannot use this session": shown as the refusal reason.
export const REFUSALS = new Set([
  "unauthorized",
  "session_limit_reached",
  "model_not_allowed",
  "origin_not_allowed",
  "unsupported_protocol",
  "limiter_unavailable",
  "server_shutting_down",
  "upstream_unavailable",
  "upstream_unauthorized",
  "upstream_rate_limited",
  "upstream_refused",
]);

// Harmless races (REALTIME.md §12.4) the page handles itself: never shown.
export const SILENT = new Set(["response_cancel_not_active", "conversation_already_has_active_response"]);

/** Plain words for an error `code`, falling back on the server's message. */
export function describe(code, message) {
  return PLAIN[code] || message || "Something went wrong.";
}

/** Plain words for a WebSocket close without an error event. */
export function describeClose(code) {
  if (code === 1000) return "The conversation ended.";
  if (code === 1006) return "The connection to the relay was lost.";
  if (code === 1012) return PLAIN.server_shutting_down;
  if (code === 1013) return "The relay is busy. Try again shortly.";
  if (code === 1014) return PLAIN.upstream_unavailable;
  return `The relay closed the connection (code ${code}).`;
}

/** Plain words for a WebRTC call that ended without an error event (`failed`: the network). */
export function describeCallEnd(failed) {
  return failed ? "The call's connection was lost." : "The conversation ended.";
}
