"""`shipyard-runtime serve`: the inference server (Open Inference Protocol v2 over REST), one concern a module.

- `settings`: the server's configuration, from command-line flags over the operator's environment (pure).
- `endpoints`: what the server answers: routing a path to an endpoint (`plan_route`, pure) and the `App` that
  handles requests and holds the serving state (loading, serving, draining) on the event loop.
- `loading`: getting the model to serve: choosing between the artifact's AOTInductor package and the eager model
  (`plan_compiled`), loading it (`fetch_model`), and one worker thread per device that builds and warms it up
  (`apply_load`).
- `lifecycle`: one running server (`Server`) and the process around it (`run_server`, `main`): listening at once,
  loading in the background, serving once ready, and the graceful drain on SIGTERM.

Sibling modules of this package hold the layers the server is built from: `httpproto` (HTTP/1.1 on asyncio, and
connection housekeeping), `oip` (the protocol's documents and errors), `batching` (dynamic batching), `engine`
(running the model on a device), `metrics` and `faults`. Dependencies go one way: `settings` <- `endpoints`,
`loading` <- `lifecycle`. The package root is empty: `shipyard-runtime serve` runs `lifecycle.main`.
"""
