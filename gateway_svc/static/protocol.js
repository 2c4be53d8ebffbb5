// The stream protocol as the dashboard speaks it: the gateway's close codes, error codes and frame
// fields, a mirror of shared/protocol.py (its protocol_table()). tests/test_protocol.py fails when the
// two disagree: a new frame field or close reason is a change there and here.

// protocol-table-begin (JSON: read by tests/test_protocol.py)
export const PROTOCOL = Object.freeze({
  "close": {
    "NORMAL": 1000,
    "GOING_AWAY": 1001,
    "UNKNOWN_RUN": 4004,
    "TRY_AGAIN_LATER": 1013,
    "SLOW_CONSUMER": 4008,
    "BAD_MESSAGE": 4400
  },
  "closeReason": {
    "RUN_ENDED": "run ended",
    "SHUTTING_DOWN": "gateway shutting down",
    "UNKNOWN_RUN": "unknown run",
    "JOURNAL_MISSING": "journal missing",
    "SLOW_CONSUMER": "slow consumer",
    "BAD_MESSAGE": "bad message",
    "EVENT_STREAM_UNAVAILABLE": "event stream unavailable"
  },
  "closeCodeOf": {
    "RUN_ENDED": "NORMAL",
    "SHUTTING_DOWN": "GOING_AWAY",
    "UNKNOWN_RUN": "UNKNOWN_RUN",
    "JOURNAL_MISSING": "UNKNOWN_RUN",
    "SLOW_CONSUMER": "SLOW_CONSUMER",
    "BAD_MESSAGE": "BAD_MESSAGE",
    "EVENT_STREAM_UNAVAILABLE": "TRY_AGAIN_LATER"
  },
  "error": {
    "UNKNOWN_RUN": "unknown_run",
    "JOURNAL_MISSING": "journal_missing",
    "JOURNAL_GAP": "journal_gap",
    "BAD_MESSAGE": "bad_message",
    "SLOW_CONSUMER": "slow_consumer",
    "CLOSED": "closed"
  },
  "frames": {
    "hello": [
      "type",
      "cursor",
      "recovered",
      "reason",
      "run_id"
    ],
    "events": [
      "type",
      "events",
      "cursor"
    ],
    "error": [
      "type",
      "code",
      "message",
      "run_id",
      "missing"
    ],
    "pong": [
      "type"
    ]
  },
  "retryableCloses": [
    1001,
    1006,
    1011,
    1012,
    1013,
    4008
  ],
  "fatalCloses": [
    4004,
    4400
  ],
  "nonFatalErrors": [
    "journal_gap"
  ]
});
// protocol-table-end

export const CLOSE = Object.freeze(PROTOCOL.close);
export const ERROR = Object.freeze(PROTOCOL.error);
const RETRYABLE_CLOSES = new Set(PROTOCOL.retryableCloses);
const FATAL_CLOSES = new Set(PROTOCOL.fatalCloses);
const NON_FATAL_ERRORS = new Set(PROTOCOL.nonFatalErrors);
const FRAME_TYPES = new Set(Object.keys(PROTOCOL.frames));

// A close after which resuming with the cursor (or the last seq) loses nothing.
export function closeIsRetryable(code) {
  return RETRYABLE_CLOSES.has(code);
}

// A close after which reconnecting cannot help (the error frame before it says why).
export function closeIsFatal(code) {
  return FATAL_CLOSES.has(code);
}

// An error frame that ends the stream (every one but journal_gap); an unknown code counts as one.
export function errorIsFatal(code) {
  return !NON_FATAL_ERRORS.has(code);
}

// One server frame from its text: the object, or null for a frame type this page does not know (a
// newer gateway's). Throws SyntaxError when it is not JSON, TypeError when it is not a frame.
export function parseFrame(text) {
  const frame = JSON.parse(text);
  if (!frame || typeof frame !== "object" || Array.isArray(frame) || typeof frame.type !== "string") {
    throw new TypeError(`not a frame: ${String(text).slice(0, 100)}`);
  }
  return FRAME_TYPES.has(frame.type) ? frame : null;
}
