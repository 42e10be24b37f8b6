-- Publishing from a trigger: each change to an application table becomes an event, in the
-- transaction that made the change (a rolled-back change publishes nothing).
--
--     psql -d app -f examples/sql/trigger.sql
--     psql -d app -c "INSERT INTO orders VALUES (42, 'user-17', 'placed')"
--
-- The trigger runs with the rights of the role that changes the table: grant that role
-- EXECUTE on outbox_publish and INSERT on event_outbox (see the README's Privileges), or make
-- the function SECURITY DEFINER, owned by a publishing role, with a fixed search_path.

CREATE TABLE IF NOT EXISTS orders (
    id       bigint PRIMARY KEY,
    user_id  text NOT NULL,
    status   text NOT NULL
);

CREATE OR REPLACE FUNCTION orders_publish() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Only real status changes publish: an UPDATE that leaves status alone sends nothing.
    IF TG_OP = 'UPDATE' AND OLD.status IS NOT DISTINCT FROM NEW.status THEN
        RETURN NULL;
    END IF;
    PERFORM outbox_publish(
        'orders',                 -- channel
        NEW.user_id,              -- the user the event is for
        jsonb_build_object('op', lower(TG_OP), 'order', NEW.id, 'status', NEW.status));
    RETURN NULL;                  -- an AFTER trigger's result is ignored
END
$$;

CREATE OR REPLACE TRIGGER orders_publish
    AFTER INSERT OR UPDATE OF status ON orders
    FOR EACH ROW
    EXECUTE FUNCTION orders_publish();
