-- What users write by hand, to compare outbox_publish with.

-- The floor: the same row inserted with no NOTIFY (same columns, same indexes).
CREATE TABLE bare_outbox (LIKE event_outbox INCLUDING DEFAULTS);
ALTER TABLE bare_outbox ADD PRIMARY KEY (id);
CREATE INDEX ON bare_outbox (created_at);
CREATE INDEX ON bare_outbox (xid, id);

-- The hand-written PL/pgSQL function: the same INSERT plus pg_notify, in one transaction.
CREATE FUNCTION plpgsql_publish(p_channel text, p_user_id text, p_payload jsonb)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid := gen_random_uuid();
BEGIN
    INSERT INTO event_outbox (id, channel, user_id, payload) VALUES (v_id, p_channel, p_user_id, p_payload);
    PERFORM pg_notify('pg_outbox', json_build_object('id', v_id, 'channel', p_channel, 'user_id', p_user_id)::text);
    RETURN v_id;
END $$;

-- The relay of pg_outbox's original design, written by hand (bench/src/bin/handwritten_replica.rs):
-- a serial id, NOTIFY of the id alone, and a SELECT by id for each notification.
CREATE TABLE handwritten_outbox (
    id          bigserial   PRIMARY KEY,
    channel     text        NOT NULL,
    user_id     text        NOT NULL,
    payload     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION handwritten_publish(p_channel text, p_user_id text, p_payload jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    INSERT INTO handwritten_outbox (channel, user_id, payload)
        VALUES (p_channel, p_user_id, p_payload) RETURNING id INTO v_id;
    PERFORM pg_notify('handwritten_outbox', v_id::text);
    RETURN v_id;
END $$;
