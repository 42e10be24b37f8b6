#!/usr/bin/env python3
"""Publish pg_outbox events from Python (psycopg 3), inside your own transactions.

    python3 examples/python/publish.py 'postgresql://app@db/app'

Publishes one event in a transaction that commits and one in a transaction that rolls back,
then prints their ids as one JSON object: {"committed": "...", "rolled_back": "..."}.
Only the committed one is ever delivered to relays.

On Debian: apt-get install python3-psycopg (or: pip install 'psycopg[binary]').
"""

import json
import sys

import psycopg
from psycopg.types.json import Jsonb

PUBLISH = "SELECT outbox_publish(%s, %s, %s, %s)"


class Rollback(Exception):
    """Raised to abandon a transaction, as a business error would."""


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: publish.py '<connection string>'", file=sys.stderr)
        return 2
    with psycopg.connect(sys.argv[1]) as conn:
        # The event commits with the business write: both or neither.
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS orders (id int, status text)")
            conn.execute("INSERT INTO orders VALUES (42, 'shipped')")
            committed = conn.execute(
                PUBLISH, ("orders", "user-17", Jsonb({"order": 42, "status": "shipped"}), "python")
            ).fetchone()[0]

        # A rollback takes the event with it: no relay ever sees it.
        rolled_back = None
        try:
            with conn.transaction():
                rolled_back = conn.execute(
                    PUBLISH, ("orders", "user-17", Jsonb({"order": 43, "status": "lost"}), "python")
                ).fetchone()[0]
                raise Rollback()
        except Rollback:
            pass

    print(json.dumps({"committed": str(committed), "rolled_back": str(rolled_back)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
