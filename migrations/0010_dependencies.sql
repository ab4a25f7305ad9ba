-- Issue 18: a session's dependencies, and the layers they are installed in.
-- meta.sessions.dependencies: NULL when the session asked for none; else
-- {"requirements": [...as asked], "runtime": "python", "layer_id": "<32 hex>",
--  "lock": "<the resolver's lock text>", "packages": [[name, version, hash], ...]}.
-- Any replica installs the layer from "lock", so every replica and every restart
-- runs the same versions.
ALTER TABLE meta.sessions ADD COLUMN dependencies jsonb;
-- The sessions that use a layer: the per-owner quota of layer bytes and the collection
-- of layers no unexpired session uses look them up by layer id.
CREATE INDEX sessions_layer_idx ON meta.sessions ((dependencies->>'layer_id'))
    WHERE dependencies IS NOT NULL;
-- One row per layer (per lock): its installed size, which MAX_LAYER_BYTES_PER_OWNER
-- counts once per owner however many of its sessions share it.
CREATE TABLE meta.layers (
    layer_id    varchar(64) PRIMARY KEY,
    runtime     varchar(32) NOT NULL,
    lock        text NOT NULL,
    bytes       bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
