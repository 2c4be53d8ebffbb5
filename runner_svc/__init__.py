"""runner_svc: executes pipeline stages as killable process groups, writes each run's journal (its only
writer) and publishes every event on a ZeroMQ PUB socket after it is in the journal."""
