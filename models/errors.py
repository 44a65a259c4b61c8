"""The error types for what a user or the environment must fix. They live at the bottom layer so models/
can raise them without importing hal/ (imports point down: launch -> trainer -> hal -> models); hal.base
re-exports them. Each ends a run with one line and its `exit_code`."""


class UserError(Exception):
    """A problem the user fixes by changing a config value, a path or an install: printed as one line,
    and the process exits with `exit_code`."""
    exit_code = 2


class WrongModelError(UserError):
    """A checkpoint was written for another model than the run's: the user's to fix, never damage."""


class CheckpointDamaged(UserError):
    """A checkpoint proven damaged: a digest, shape or dtype that disagrees with its manifest, a missing
    tensor, a manifest that is not what trichip writes. A resume may skip it for an older good one."""


class StorageError(UserError):
    """Checkpoint storage could not be read or written: permissions, a full disk, a network or object-store
    outage that outlasted the retries. Never a reason to fall back to an older checkpoint or a fresh init;
    nothing good was removed, so the same command works again once the storage does."""
    exit_code = 3


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), at most `limit` chars."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
