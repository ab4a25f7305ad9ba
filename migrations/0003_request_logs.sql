-- Request and error logs, columns as in the service we replace, plus grpc_code (ours).
-- One request_logs row per Execute call, refused ones included; written in batches
-- by the server's RequestLogWriter, off the hot path.
--
-- status_code is the HTTP equivalent of the call's gRPC status (OK 200,
-- INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, ...),
-- except that an Execute answered OK whose script failed (ExecuteResponse.error)
-- is 500, so that the views count it as an error; grpc_code keeps the real status.
CREATE TABLE public.request_logs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    request_id       varchar(64),
    language_title   varchar(128) NOT NULL,
    "timestamp"      timestamptz NOT NULL DEFAULT now(),
    client_ip        varchar(45),
    user_id          varchar(128),
    request_headers  jsonb,
    request_payload  jsonb,
    response_payload jsonb,
    status_code      integer NOT NULL,
    duration_ms      integer NOT NULL,
    cached           boolean NOT NULL DEFAULT false,
    error_details    jsonb,
    runtime_metrics  jsonb,
    grpc_code        text
);

CREATE INDEX request_logs_timestamp_idx ON public.request_logs ("timestamp");
CREATE INDEX request_logs_language_title_idx ON public.request_logs (language_title);
CREATE INDEX request_logs_status_code_idx ON public.request_logs (status_code);
CREATE INDEX request_logs_user_id_idx ON public.request_logs (user_id);
CREATE INDEX request_logs_request_id_idx ON public.request_logs (request_id);

-- A failed execution's ExecutionError (code RUNTIME_ERROR, TIMEOUT, ...), or a refused
-- call's ErrorInfo reason (NOT_FOUND, INVALID_REQUEST, ...). Deleting old request logs
-- takes their error rows with them.
CREATE TABLE public.error_logs (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    request_log_id uuid NOT NULL REFERENCES public.request_logs (id) ON DELETE CASCADE,
    "timestamp"    timestamptz NOT NULL DEFAULT now(),
    error_code     varchar(64) NOT NULL,
    error_message  text NOT NULL,
    stack_trace    text,
    context        jsonb
);

CREATE INDEX error_logs_request_log_id_idx ON public.error_logs (request_log_id);
CREATE INDEX error_logs_timestamp_idx ON public.error_logs ("timestamp");
CREATE INDEX error_logs_error_code_idx ON public.error_logs (error_code);

CREATE SCHEMA IF NOT EXISTS analytics;

-- Days are UTC days, whatever the session's TimeZone.
CREATE VIEW analytics.daily_usage_stats AS
SELECT
    (r."timestamp" AT TIME ZONE 'UTC')::date                                 AS day,
    r.language_title,
    count(*)                                                                 AS total_requests,
    count(*) FILTER (WHERE r.status_code BETWEEN 200 AND 299)                AS successful_requests,
    count(*) FILTER (WHERE r.status_code >= 400)                             AS error_requests,
    count(*) FILTER (WHERE r.cached)                                         AS cached_requests,
    avg(r.duration_ms)::double precision                                     AS avg_duration_ms,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY r.duration_ms)              AS p95_duration_ms,
    percentile_cont(0.99) WITHIN GROUP (ORDER BY r.duration_ms)              AS p99_duration_ms,
    count(DISTINCT r.user_id)                                                AS unique_users
FROM public.request_logs AS r
GROUP BY 1, 2;

-- The last 7 days, per function.
CREATE VIEW analytics.function_performance AS
SELECT
    r.language_title,
    count(*)                                                                 AS total_requests,
    count(*) FILTER (WHERE r.status_code BETWEEN 200 AND 299)                AS successful_requests,
    avg(r.duration_ms)::double precision                                     AS avg_duration_ms,
    percentile_cont(0.50) WITHIN GROUP (ORDER BY r.duration_ms)              AS p50_duration_ms,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY r.duration_ms)              AS p95_duration_ms,
    percentile_cont(0.99) WITHIN GROUP (ORDER BY r.duration_ms)              AS p99_duration_ms,
    min(r.duration_ms)                                                       AS min_duration_ms,
    max(r.duration_ms)                                                       AS max_duration_ms,
    count(*) FILTER (WHERE r.status_code >= 400)                             AS error_count,
    (count(*) FILTER (WHERE r.status_code >= 400))::double precision / count(*) AS error_rate,
    count(*) FILTER (WHERE r.cached)                                         AS cache_hits,
    (count(*) FILTER (WHERE r.cached))::double precision / count(*)          AS cache_hit_ratio
FROM public.request_logs AS r
WHERE r."timestamp" > now() - interval '7 days'
GROUP BY r.language_title;
