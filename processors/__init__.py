"""Stream processors (faust-streaming): context retrieval from Redis and compression."""
