// `kvcrunch serve`: the HTTP layer (OpenAI-compatible) over the batched engine.
//
// Threads: cpp-httplib (Debian's libcpp-httplib 0.11.4) serves each connection on one thread
// (blocking I/O): max_connections + kSpareThreads threads at start, grown on demand up to
// kMaxHttpThreads while connections wait without a request (keep-alive, slow clients). A handler thread validates the
// request, tokenizes it (the tokenizer is immutable and thread-safe), submits an engine::Request
// whose sink pushes events into a per-request queue (the sink runs on the engine thread and only
// locks, pushes and notifies), then blocks on that queue and writes the response: one JSON object,
// or SSE frames as tokens arrive. A client that goes away is noticed within kPollSeconds (the
// socket is polled while waiting) and its request is cancelled: the engine frees its KV at the
// next step. The HTTP layer never touches the model beyond its tokenizer.
//
// Limits and auth sit in one place (Server::Gate) in front of every route: the API key (all routes
// but /health), at most max_connections inference requests in flight (503 beyond, answered at
// once by the spare threads), the body size (413), draining on shutdown (503).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "api.h"
#include "kv_store.h"
#include "engine/engine.h"
#include "kvcrunch/status.h"
#include "tokenizer/tokenizer.h"

namespace kvc::server {

// Threads beyond max_connections: they answer probes, metrics and refusals while every
// inference slot holds a stream.
inline constexpr int kSpareThreads = 8;
// Most HTTP threads (= connections served at once). cpp-httplib 0.11.4 polls sockets with
// select(), which cannot watch descriptors >= FD_SETSIZE (1024): stay well below.
inline constexpr int kMaxHttpThreads = 960;
// How often a waiting handler checks that its client is still connected.
inline constexpr double kPollSeconds = 0.1;

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                    // 0: any free port (printed)
  std::string model_id;               // /v1/models id and the "model" of responses
  int64_t max_body_bytes = 4 << 20;   // 413 beyond (JSON bodies)
  int64_t max_session_bytes = int64_t(1) << 30;  // PUT /v1/sessions/NAME/kv bodies (413 beyond)
  int max_connections = 64;           // inference requests in flight (streams included)
  std::vector<Digest> api_keys;       // empty: no auth
  Limits limits;                      // n_ctx, n_vocab, default max_tokens
  double shutdown_grace_seconds = 30; // SIGTERM: running requests may finish for this long
  double sse_ping_seconds = 15;       // a stream with nothing to send for this long gets an SSE
                                      // comment (": ping"), for proxies and client read timeouts
};

// Serves until SIGTERM or SIGINT, then: stops admitting (503), lets running requests finish for
// up to shutdown_grace_seconds, cancels the rest, stops the listener and the engine. Returns the
// process exit code (0 after a signal; 1 when the port cannot be bound). The engine must be
// created but not started; InstallTerminationHandlers must have run (first thing in the command,
// so that a signal during model loading drains an empty server instead of killing the process).
// store (may be null): the prefix cache, shared tier and sessions (kv_store.h, docs/store.md).
int Serve(engine::Engine& eng, const Tokenizer& tok, const KvPolicy& kv, const ServerOptions& opt,
          KvStore* store = nullptr);

// SIGTERM/SIGINT handlers that hand the signal to Serve; SIGPIPE ignored (a write to a client
// that went away fails instead).
void InstallTerminationHandlers();

}  // namespace kvc::server
