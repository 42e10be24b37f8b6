-- pg_outbox 0.4.0 -> 0.5.0
-- * Notifications are sealed by default (pg_outbox.notify_payload = 'sealed'), with a key kept in
--   the new table outbox_seal_keys, read by relays through outbox_relay_keys() and rotated with
--   outbox_rotate_seal_key(). The setting pg_outbox.seal_key is gone: the key it held, if any,
--   becomes the first key of the table, so relays of 0.4.0 built with RelayBuilder::seal_key keep
--   opening notifications until they are upgraded. Without it, a fresh random key is made.
-- * Events deleted by hand are recorded in outbox_prune_state, so that relays report them lost
--   (a reference to a row that never was is now counted as forged, not as a gap).
\echo Use "ALTER EXTENSION pg_outbox UPDATE TO '0.5.0'" to load this file. \quit

CREATE TABLE outbox_seal_keys (
    key         bytea       PRIMARY KEY CHECK (length(key) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz
);
CREATE UNIQUE INDEX outbox_seal_keys_current_idx ON outbox_seal_keys ((true)) WHERE expires_at IS NULL;

CREATE  FUNCTION "outbox_relay_keys"() RETURNS TABLE (
	"keys" bytea[],  /* Vec < Vec < u8 > > */
	"notify_payload" TEXT  /* & '_ str */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'outbox_relay_keys_wrapper';

CREATE FUNCTION outbox_rotate_seal_key(grace interval DEFAULT '10 minutes')
    RETURNS timestamptz
    VOLATILE PARALLEL UNSAFE
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    retired_at timestamptz := now() + grace;
BEGIN
    IF grace IS NULL OR grace < interval '0' THEN
        RAISE EXCEPTION 'outbox_rotate_seal_key: grace must be zero or more, not %', grace
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Give relays time to read the new key: the default, 10 minutes, is plenty.';
    END IF;
    DELETE FROM @extschema@.outbox_seal_keys WHERE expires_at <= now();
    UPDATE @extschema@.outbox_seal_keys SET expires_at = retired_at WHERE expires_at IS NULL;
    -- 32 bytes from three random UUIDs (366 random bits, from the server's strong random source).
    INSERT INTO @extschema@.outbox_seal_keys (key)
    VALUES (sha256(uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid())
                   || uuid_send(gen_random_uuid())));
    RETURN retired_at;
END
$$;

COMMENT ON FUNCTION outbox_rotate_seal_key(interval) IS
    'Seal notifications with a new random key from now on; relays still open the previous one until the returned time';

CREATE FUNCTION outbox_seal_keys_changed() RETURNS trigger
    LANGUAGE c
    AS 'MODULE_PATHNAME', 'outbox_seal_keys_changed';
CREATE TRIGGER outbox_seal_keys_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON outbox_seal_keys
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_seal_keys_changed();

REVOKE ALL ON TABLE outbox_seal_keys FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_rotate_seal_key(interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_seal_keys_changed() FROM PUBLIC;

-- Events deleted by hand (DELETE FROM event_outbox, which reaches the segments too, or TRUNCATE)
-- are recorded as pruned, as the pruner records its own: a relay that had not read them reports
-- them lost (Gap::Missing, Gap::Pruned) rather than counting their notifications as forged.
CREATE FUNCTION outbox_record_deleted() RETURNS trigger
    VOLATILE PARALLEL UNSAFE
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        -- Which rows went is not known: every transaction that has ended may have lost some.
        UPDATE @extschema@.outbox_prune_state SET pruned_through_xid = greatest(pruned_through_xid,
            (pg_snapshot_xmax(pg_current_snapshot())::text::bigint - 1)::text::xid8);
    ELSE
        UPDATE @extschema@.outbox_prune_state
           SET pruned_through_xid = greatest(pruned_through_xid,
                   (SELECT xid FROM gone ORDER BY xid DESC LIMIT 1))
         WHERE EXISTS (SELECT FROM gone);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_deleted
    AFTER DELETE ON event_outbox REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_record_deleted();
CREATE TRIGGER outbox_truncated
    AFTER TRUNCATE ON event_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_record_deleted();
REVOKE ALL ON FUNCTION outbox_record_deleted() FROM PUBLIC;

-- The key of pg_outbox.seal_key (base64, either alphabet, padded or not), if one is set.
DO $$
DECLARE
    configured text := translate(trim(coalesce(current_setting('pg_outbox.seal_key', true), '')), '-_=', '+/');
BEGIN
    IF configured <> '' THEN
        BEGIN
            INSERT INTO @extschema@.outbox_seal_keys (key)
            VALUES (decode(rpad(configured, (length(configured) + 3) / 4 * 4, '='), 'base64'));
        EXCEPTION WHEN invalid_parameter_value OR check_violation THEN
            RAISE WARNING 'pg_outbox: pg_outbox.seal_key is not 32 bytes in base64; a new key was made instead';
        END;
    END IF;
END
$$;
SELECT outbox_rotate_seal_key() WHERE NOT EXISTS (SELECT FROM outbox_seal_keys);
