/**
 * Versioned schema for the PostgreSQL store, version for version the same
 * tables as SQLITE_MIGRATIONS so that "schema version 3" means one thing.
 * Append new versions; never edit one that has shipped, because databases
 * in the field have applied it.
 *
 * Times are BIGINT epoch milliseconds. Text that is sorted or paged on
 * (names, MACs, ids) is COLLATE "C", so that order and `name > $after`
 * agree with SQLite's byte order whatever the database's locale.
 */
export const POSTGRES_MIGRATIONS: readonly { version: number; description: string; sql: string }[] = [
  {
    version: 1,
    description: 'nodes, ports and node events',
    sql: `
      CREATE TABLE nodes (
        uuid TEXT PRIMARY KEY,
        name TEXT COLLATE "C" NOT NULL UNIQUE,
        provision_state TEXT NOT NULL,
        target_provision_state TEXT,
        maintenance BOOLEAN NOT NULL DEFAULT false,
        maintenance_reason TEXT NOT NULL DEFAULT '',
        last_error TEXT NOT NULL DEFAULT '',
        properties TEXT NOT NULL DEFAULT '{}',
        agent_address TEXT NOT NULL DEFAULT '',
        agent_version TEXT NOT NULL DEFAULT '',
        agent_status TEXT NOT NULL DEFAULT '',
        agent_token_hash TEXT,
        last_heartbeat_at BIGINT,
        liveness_at BIGINT,
        reservation TEXT,
        reservation_operation TEXT,
        inventory TEXT,
        -- JSON text, kept as written (NodeRecord.deployJson); read with deploy::jsonb where needed.
        deploy TEXT,
        progress TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        provision_updated_at BIGINT NOT NULL
      );
      -- The sweep's query: wait states ordered by liveness, so it reads only the timed-out rows.
      CREATE INDEX nodes_state_liveness ON nodes (provision_state, liveness_at);
      CREATE INDEX nodes_reservation ON nodes (reservation) WHERE reservation IS NOT NULL;
      CREATE TABLE ports (
        mac_address TEXT COLLATE "C" PRIMARY KEY,
        node_uuid TEXT NOT NULL REFERENCES nodes (uuid) ON DELETE CASCADE
      );
      CREATE INDEX ports_node ON ports (node_uuid);
      CREATE TABLE node_events (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        node_uuid TEXT NOT NULL REFERENCES nodes (uuid) ON DELETE CASCADE,
        time BIGINT NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        actor TEXT NOT NULL,
        from_state TEXT,
        to_state TEXT
      );
      CREATE INDEX node_events_node ON node_events (node_uuid, id);
    `,
  },
  {
    version: 2,
    description: 'images',
    sql: `
      CREATE TABLE images (
        name TEXT COLLATE "C" PRIMARY KEY,
        state TEXT NOT NULL,
        sha256 TEXT NOT NULL DEFAULT '',
        size_bytes BIGINT NOT NULL DEFAULT 0,
        source_url TEXT NOT NULL DEFAULT '',
        expected_checksum TEXT NOT NULL DEFAULT '',
        error TEXT NOT NULL DEFAULT '',
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
      );
      CREATE INDEX images_sha256 ON images (sha256);
    `,
  },
  {
    version: 3,
    description: 'several controllers: ring hash, agent API credential, lock queue, controller registry',
    sql: `
      ALTER TABLE nodes ADD COLUMN ring_hash BIGINT;
      -- ringHash() of controller/cluster/hash-ring.ts: the first four bytes of sha256(uuid), unsigned.
      UPDATE nodes SET ring_hash = ('x' || left(encode(sha256(convert_to(uuid, 'UTF8')), 'hex'), 8))::bit(32)::bigint;
      ALTER TABLE nodes ALTER COLUMN ring_hash SET NOT NULL;
      ALTER TABLE nodes ADD COLUMN agent_api_token TEXT;
      CREATE INDEX nodes_ring_hash ON nodes (ring_hash);
      CREATE TABLE node_lock_waiters (
        ticket BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        node_uuid TEXT NOT NULL REFERENCES nodes (uuid) ON DELETE CASCADE,
        holder TEXT NOT NULL,
        operation TEXT NOT NULL,
        created_at BIGINT NOT NULL
      );
      CREATE INDEX node_lock_waiters_node ON node_lock_waiters (node_uuid, ticket);
      CREATE INDEX node_lock_waiters_holder ON node_lock_waiters (holder);
      CREATE TABLE controllers (
        id TEXT COLLATE "C" PRIMARY KEY,
        address TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        last_seen_at BIGINT NOT NULL
      );
    `,
  },
  {
    version: 4,
    description: 'the agent certificate pinned for each node',
    sql: `
      -- PEM; set from the first heartbeat that carries one after a lookup, wiped with the agent token.
      ALTER TABLE nodes ADD COLUMN agent_certificate TEXT;
    `,
  },
  {
    version: 5,
    description: 'operator tokens and the cluster secret',
    sql: `
      -- Operator API tokens (controller/auth/operator-auth.ts): only the sha256 of a token is stored.
      CREATE TABLE operator_tokens (
        id TEXT COLLATE "C" PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('admin', 'reader')),
        description TEXT NOT NULL DEFAULT '',
        created_at BIGINT NOT NULL,
        last_used_at BIGINT
      );
      -- One row: the secret controllers present to each other (as readers) when they copy images.
      CREATE TABLE cluster_secret (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        secret TEXT NOT NULL,
        created_at BIGINT NOT NULL
      );
    `,
  },
  {
    version: 6,
    description: 'node secrets (BMC passwords), sealed by the controller',
    sql: `
      -- JSON object: secret name -> value sealed with the controller's secrets key (controller/secrets/secret-box.ts).
      ALTER TABLE nodes ADD COLUMN secrets TEXT NOT NULL DEFAULT '{}';
    `,
  },
  {
    version: 7,
    description: 'power state sync: the last power state seen or set for each node, and its BMC failures',
    sql: `
      -- controller/power/sync.ts: one row per node with a power driver, written by the sync and by power actions.
      CREATE TABLE node_power (
        node_uuid TEXT PRIMARY KEY REFERENCES nodes (uuid) ON DELETE CASCADE,
        -- 'on', 'off', or '' when not known yet.
        power_state TEXT NOT NULL DEFAULT '' CHECK (power_state IN ('', 'on', 'off')),
        checked_at BIGINT,
        -- Power state reads that failed in a row, and the last failure's message.
        failures INTEGER NOT NULL DEFAULT 0,
        error TEXT NOT NULL DEFAULT ''
      );
    `,
  },
  {
    version: 8,
    description: 'image formats and extents; config drives',
    sql: `
      -- The format as uploaded or imported, and that file's checksum and size (qcow2 is stored converted to raw).
      ALTER TABLE images ADD COLUMN format TEXT NOT NULL DEFAULT 'raw';
      ALTER TABLE images ADD COLUMN source_sha256 TEXT NOT NULL DEFAULT '';
      ALTER TABLE images ADD COLUMN source_size_bytes BIGINT NOT NULL DEFAULT 0;
      -- The ranges of the raw content that hold data, as JSON [[offset, length], ...]; null when not recorded.
      ALTER TABLE images ADD COLUMN extents TEXT;
      ALTER TABLE images ADD COLUMN allocated_bytes BIGINT;
      ALTER TABLE images ADD COLUMN extent_count INTEGER NOT NULL DEFAULT 0;
      -- A deployment's config drive (gzip of the ISO): kept from the deploy request until the node is cleaned.
      CREATE TABLE node_config_drives (
        node_uuid TEXT PRIMARY KEY REFERENCES nodes (uuid) ON DELETE CASCADE,
        gzip BYTEA NOT NULL,
        sha256 TEXT NOT NULL,
        size_bytes BIGINT NOT NULL,
        created_at BIGINT NOT NULL
      );
    `,
  },
  {
    version: 9,
    description: 'chunk manifests of image content',
    sql: `
      -- docs/chunk-manifest.md: per content (sha256 of the raw image), shared by images with the same content.
      -- Images stored before this version get theirs built on first use (controller/images/manifest/).
      CREATE TABLE image_manifests (
        sha256 TEXT PRIMARY KEY,
        size_bytes BIGINT NOT NULL,
        chunk_size INTEGER NOT NULL,
        chunk_count INTEGER NOT NULL,
        root_sha256 TEXT NOT NULL,
        -- 32 bytes per chunk, in order; and one bit per chunk, set for all-zero chunks.
        digests BYTEA NOT NULL,
        zero_bitmap BYTEA NOT NULL,
        created_at BIGINT NOT NULL
      );
    `,
  },
];
