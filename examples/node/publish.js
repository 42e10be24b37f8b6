// Publish pg_outbox events from Node.js (node-postgres), inside your own transactions.
//
//     npm ci --prefix examples/node
//     node examples/node/publish.js 'postgresql://app@db/app'
//
// Publishes one event in a transaction that commits and one in a transaction that rolls back,
// then prints their ids as one JSON object: {"committed": "...", "rolled_back": "..."}.
// Only the committed one is ever delivered to relays.

'use strict';

const { Client } = require('pg');

const PUBLISH = 'SELECT outbox_publish($1, $2, $3, $4) AS id';

async function main() {
  if (process.argv.length !== 3) {
    console.error("usage: publish.js '<connection string>'");
    process.exit(2);
  }
  const client = new Client({ connectionString: process.argv[2] });
  await client.connect();
  try {
    // The event commits with the business write: both or neither.
    await client.query('BEGIN');
    await client.query('CREATE TEMP TABLE IF NOT EXISTS orders (id int, status text)');
    await client.query("INSERT INTO orders VALUES (42, 'shipped')");
    const committed = await client.query(PUBLISH, [
      'orders', 'user-17', { order: 42, status: 'shipped' }, 'node',
    ]);
    await client.query('COMMIT');

    // A rollback takes the event with it: no relay ever sees it.
    await client.query('BEGIN');
    const rolledBack = await client.query(PUBLISH, [
      'orders', 'user-17', { order: 43, status: 'lost' }, 'node',
    ]);
    await client.query('ROLLBACK');

    console.log(JSON.stringify({
      committed: committed.rows[0].id,
      rolled_back: rolledBack.rows[0].id,
    }));
  } finally {
    await client.end();
  }
}

main().catch((err) => {
  console.error(`publish.js: ${err.message}`);
  process.exit(1);
});
