"""Read pg_outbox's logical-decoding messages from a replication slot, through pgoutput.

With `pg_outbox.logical_messages = on`, every committed `outbox_publish` is also a transactional
message with the prefix `pg_outbox` in the WAL. This consumer streams a pgoutput slot with
`messages 'true'`, prints each pg_outbox message's document (one JSON line per event, in commit
order), and confirms what it read, so that a restarted consumer goes on from there.

    python3 consume_messages.py DSN SLOT PUBLICATION UNTIL_LSN

It stops once it has read the WAL up to UNTIL_LSN (for example `pg_current_wal_lsn()` when
started); a real consumer would run until stopped. Needs psycopg2 (Debian: python3-psycopg2),
whose replication protocol support psycopg 3 does not have yet.
"""

import select
import struct
import sys

import psycopg2
import psycopg2.extras

PREFIX = b"pg_outbox"


def parse_lsn(text):
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def message_content(data):
    """The content of a pgoutput Message ('M') with our prefix, or None for anything else.

    Protocol version 1: 'M', flags (int8, 1 = transactional), the message's LSN (int64), the
    prefix (a NUL-terminated string), the content's length (int32), the content.
    """
    if data[:1] != b"M":
        return None
    end = data.index(b"\0", 10)
    if data[10:end] != PREFIX:
        return None
    (length,) = struct.unpack("!i", data[end + 1 : end + 5])
    return data[end + 5 : end + 5 + length]


def main():
    dsn, slot, publication, until = sys.argv[1:5]
    until = parse_lsn(until)
    conn = psycopg2.connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    cur = conn.cursor()
    cur.start_replication(
        slot_name=slot,
        decode=False,
        options={"proto_version": "1", "publication_names": publication, "messages": "true"},
    )
    while True:
        message = cur.read_message()
        if message is not None:
            content = message_content(message.payload)
            if content is not None:
                print(content.decode("utf-8"), flush=True)
            continue
        # Nothing buffered. The server's keepalives say how far it has sent (wal_end): past
        # UNTIL, everything before it was read.
        if cur.wal_end >= until:
            break
        cur.send_feedback(reply=True)
        select.select([cur], [], [], 1.0)
    # Confirm what was read: a consumer started again from this slot goes on from here.
    cur.send_feedback(flush_lsn=until, force=True)
    conn.close()


if __name__ == "__main__":
    main()
