SELECT outbox_publish('chat', 'user-' || floor(random() * :users)::int, '{"text": "hello from the benchmark", "room": 42, "tags": ["a", "b"]}') FROM generate_series(1, :batch);
