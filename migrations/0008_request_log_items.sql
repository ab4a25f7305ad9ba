-- ExecuteBatch is logged as ONE request_logs row per call, not a row per item: a batch
-- of 1,000 would otherwise cost the log writer 1,000 rows for one call, and the row's
-- duration is the call's. `items` says how many items the call carried (the session
-- counted that many executions); NULL for every other call (an Execute is one).
-- The row's request_payload is the array of the items' params and its response_payload
-- the array of their answers (a result, {"error": ...} or {"status": ...}), cut at the
-- writer's payload bound like Execute's. status_code is 200 when every item answered
-- a result, 500 when one failed or did not run (error_details counts them), or the
-- call's own status when it was refused.
ALTER TABLE public.request_logs ADD COLUMN items integer;
