"""`streamguard serve`: a synchronous check at upload time, judged by the worker's own pipeline.

- `app`: the service assembled from the settings (scorer, dedupe, fetcher, health) and its lifecycle;
- `http`: ``POST /v1/check`` on a bounded thread pool; refusals before the body is read;
- `batcher`: concurrent checks judged together through one `BatchProcessor`;
- `checks`: a request as the `ImageEvent` record the worker would consume;
- `answers`: a verdict or dead letter as an HTTP status and body;
- `auth`, `ratelimit`: hashed API keys with optional tenant binding; per-key token buckets.
"""
