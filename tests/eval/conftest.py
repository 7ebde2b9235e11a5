"""Import ``datasets`` at collection: its log handler then binds to the session's stderr, not to
the capsys stream (closed after that test) of whichever test happens to load data first."""
import datasets  # noqa: F401
