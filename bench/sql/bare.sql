INSERT INTO bare_outbox (id, channel, user_id, payload) VALUES (gen_random_uuid(), 'chat', 'user-1', '{"text": "hello from the benchmark", "room": 42, "tags": ["a", "b"]}');
