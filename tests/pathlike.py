"""Path-likes for the tests of the path checks (``checks.refuse_empty_path`` and its callers)."""
import os


class EmptyPath(os.PathLike):
    """An os.PathLike whose path is '': ``Path`` reads it as the working folder, as it reads ''."""

    def __fspath__(self) -> str:
        return ""
