-- Issue 17's write-behind counts (store/hot_sessions.py), made idempotent: each replica
-- numbers its flushes, and a flush's counts are added only when its number is past the
-- last one recorded for that replica, in the same statement. A flush whose answer was
-- lost (a commit that happened, its reply cut) is sent again with the same number and
-- adds nothing the second time; one that never arrived adds its counts then. One row
-- per server process (a replica's id is new at each start); rows not written for a day
-- are removed by the cleanup (store/cleanup.py).
CREATE TABLE meta.count_flushes (
    replica     uuid PRIMARY KEY,
    flush       bigint NOT NULL,
    written_at  timestamptz NOT NULL DEFAULT now()
);
