"""Cluster mode (the `[cluster]` config section): the event stream on NATS JetStream (events.py) and
the shared state on PostgreSQL (state.py). Imported only when that section is present; it imports
`shared`, never the reverse."""
