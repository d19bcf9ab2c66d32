"""`partita serve`: the cluster behind an HTTP server (face layer).

- `signature`: the model's flat inputs and outputs in the protocol's terms.
- `protocol`: Open Inference Protocol v2 infer requests and responses (JSON and binary tensors).
- `batcher`: dynamic batching of concurrent requests into one pipeline request.
- `metrics`: the Prometheus metrics; `state`: the live picture (`/api/state`, events, gauges).
- `app`: the Starlette routes; `server`: the service, deploy for serving, uvicorn with draining.
- `static/`: the dashboard (plain JS, no CDN).
"""
