"""Every error runwire raises on purpose, under one base, each saying what went wrong and where."""


class RunwireError(Exception):
    """Base of all runwire errors; its message is meant for the person reading it."""

    code = "error"


class ConfigError(RunwireError):
    """The configuration file is missing, unreadable or invalid (names file, key, expectation)."""

    code = "bad_config"


class InvalidRunId(RunwireError):
    """A run id does not match the contract's pattern."""

    code = "invalid_run_id"


class UnknownPipeline(RunwireError):
    """A pipeline name that the configuration does not define."""

    code = "unknown_pipeline"


class BadParams(RunwireError):
    """Launch parameters that do not fit the pipeline's declared parameters."""

    code = "bad_params"


class JournalError(RunwireError):
    """A journal file could not be opened, locked, repaired or appended to."""

    code = "journal_error"


class RunEnded(JournalError):
    """An append to a journal whose run already has its terminal event."""

    code = "run_ended"


class JournalBusy(JournalError):
    """A journal whose flock another writer holds (alive, hung or partitioned: flock cannot tell)."""


class JournalFenced(JournalError):
    """A writer's journal file was replaced under it (the scheduler ended the run in its place): the
    writer must write and publish nothing more for that run."""


class BindError(RunwireError):
    """A service could not bind (or listen on) one of its endpoints: names the endpoint, the config key
    that sets it and the file, so the fix is one edit (or stopping the other process on it)."""

    code = "bind_failed"

    def __init__(self, key: str, endpoint: str, reason: str, config: object = None, what: str = "socket") -> None:
        self.key, self.endpoint, self.reason = key, endpoint, reason
        where = f" in {config}" if config else ""
        super().__init__(f"{key}: cannot bind {what} on {endpoint}: {reason} (another process on it? "
                         f"change {key}{where})")


class ProtocolError(RunwireError):
    """A message on a control socket that is not a valid request or reply."""

    code = "bad_request"


class BadReply(ProtocolError):
    """A service's answer that is not of the request's reply type (another version, or a bug): the
    caller cannot know what was done."""

    code = "bad_reply"


class ServiceUnavailable(RunwireError):
    """A service did not answer on its control socket within the timeout."""

    code = "unavailable"


class NotFound(RunwireError):
    """A run or schedule that does not exist."""

    code = "not_found"


class Conflict(RunwireError):
    """An operation that the current state does not allow (e.g. cancel of an ended run)."""

    code = "conflict"


class LeaseLost(Conflict):
    """A lease (cluster mode) whose fencing token, its attempt, is no longer the current one: another
    holder took it over after it expired, and the old holder must stop acting for it."""


class BadCommand(RunwireError):
    """A command stage's argv names a placeholder that has no value (runner)."""

    code = "bad_command"


class InternalError(RunwireError):
    """A service failed while handling a request; its log has the traceback."""

    code = "internal"


# the errors a control reply can carry, rebuilt by the client from their code (BindError never travels)
ERRORS_BY_CODE: dict[str, type[RunwireError]] = {
    cls.code: cls
    for cls in (
        ConfigError, InvalidRunId, UnknownPipeline, BadParams, JournalError, RunEnded,
        ProtocolError, BadReply, ServiceUnavailable, NotFound, Conflict, BadCommand, InternalError,
    )
}
