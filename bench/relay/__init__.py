"""Benchmark of the relay hop: the latency it adds, its CPU per event and its memory per session.

Run: ``.venv/bin/python -m bench.relay [--sessions 50 200] [--seconds 20] [--json out.json]``
from the repository's root (about 3 minutes with the defaults). Everything runs on 127.0.0.1 and
is bounded in time.

For each N it runs N concurrent sessions against three targets, one after the other:

* ``direct``: the load generator talks to the upstream itself (the baseline);
* ``relay``: through the ``realtime-relay`` command, as users run it (a fresh process per run,
  configured by ``RELAY_*`` variables, policy and metrics on);
* ``nginx``: through an nginx WebSocket pass-through that sets the Authorization header (one
  worker, a temporary prefix; skipped with a clear message when ``nginx`` is not installed, or
  left out with ``--targets direct relay``).

Each session streams PCM16 24 kHz as ``input_audio_buffer.append`` events of 20 ms (base64 JSON)
paced at real time, and every ``--turn-seconds`` sends ``input_audio_buffer.commit`` and
``response.create``; the upstream answers with a response of ``--response-ms`` of audio in 100 ms
``response.output_audio.delta`` events paced at playback speed, then ``response.done`` with usage.

Processes: the upstream (an echo server, ``bench.relay.upstream``, speaking enough of the GA
Realtime protocol for the relay: ``session.created`` first, ``session.updated``, ``committed``,
responses) and the load generator(s) (``bench.relay.loadgen``) run as their own processes, so the
hop's CPU is read alone from ``/proc``.

Latency: every event carries its send time in ``event_id`` as ``t:<CLOCK_MONOTONIC ns>``, stamped
by the client (client->upstream) or by the upstream (upstream->client); the receiver subtracts it
from its own ``time.monotonic_ns()``. CLOCK_MONOTONIC is one clock for the whole machine on Linux,
so stamps from different processes compare; the bench checks this before it starts. The
upstream's event type stays first in each frame, as OpenAI writes it (the relay types upstream
events from that prefix). "Added" latency is a through-target percentile minus the direct
percentile at the same N (a difference of percentiles, not a percentile of differences).

Cost: CPU seconds (utime + stime of the hop process and its children, e.g. the nginx worker) per
1,000 events relayed in the measured window (client->upstream plus upstream->client), and RSS per
session: (VmRSS with N sessions open - VmRSS idle after a warm-up) / N.

Opus mode (``--codec opus``, issue 5; sessions 50 and 100 by default, about 2 minutes): the relay
sessions connect to ``/ws?input_codec=opus&input_rate=48000&output_codec=opus&output_bitrate=32000``
and each sends one 20 ms Opus packet (48 kHz mono, 32 kbps, encoded once before the runs from
espeak-ng speech, or a synthetic voiced signal without espeak-ng) per 20 ms as a binary frame
``0x01 + packet``, with the same commits and responses; the relay answers each output delta with
its JSON event (``delta`` emptied, ``relay_audio``) and ``relay_audio.frames`` binary frames
``0x02 + packet``, which the load generator counts and sizes. Only the relay transcodes, so the
``direct`` target runs as today (JSON PCM appends) as the latency baseline; nginx is not run.
Figures: the relay's CPU per session-second (hop CPU-seconds / (N x window seconds)) and its
inverse, talking sessions per core (a linear extrapolation from N); per-frame latency by a timing
channel: each session first sends ``input_audio_buffer.clear`` with ``event_id`` ``sid:<id>``,
which the upstream uses to name the connection, then the load generator records the send time of
packet k and the upstream the arrival of append k (the relay decodes Opus natively at 24 kHz
without a resampler, so appends are 1:1 with packets, in order); down, the arrival of the last
binary frame of each stamped delta. Added = minus the direct baseline at the same N, as above.
Also the relay's own ``realtime_relay_added_latency_seconds`` and ``transcode_seconds``
histograms, scraped from its ``/metrics`` at both ends of the window, with p50/p99 interpolated in
the bucket deltas as Prometheus' ``histogram_quantile`` does (bucket resolution only; they time
the relay's handler from receipt to send, not its socket queues).

Sideband mode (``--sideband``, issue 16; N 100 and 400 by default): N WebRTC calls created
through the relay's ``POST /v1/realtime/calls``, whose sidebands the relay holds while the upstream
streams each a scripted voice turn's server events every ``--turn-seconds`` (no audio touches the
relay, as on a real call), beside N WebSocket sessions through the relay: CPU per session-second
and sessions per core for both, CPU per 1,000 events and RSS per session (``sideband``).

Modules: ``cli`` (options, the sequence of runs, the JSON file), ``run`` (one target at one N),
``servers`` (the upstream, relay and nginx processes, and their warm-up), ``sideband`` (the
calls' runs and their report), ``upstream`` and ``loadgen`` (the child processes), ``measure``
(CPU, memory and percentiles), ``metrics`` (the relay's histograms), ``report`` and
``opus_report`` (tables, warnings, the issues' targets), ``opus_input`` (the Opus packets sent),
``processes`` (children, stopped on every exit) and ``wire`` (what the processes agree on).
"""
