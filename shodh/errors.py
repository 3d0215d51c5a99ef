"""Errors shodh reports to users as one clear line (the CLI prints them without a traceback)."""


class ShodhError(Exception):
    """A problem the user can fix: bad input, bad config, a workspace in the wrong state."""


class ConfigError(ShodhError):
    """A config value, key, profile or override is invalid; the message names the field."""


class DataError(ShodhError):
    """A shard, manifest or array is missing or corrupt; the message names the file and key."""


def check(ok: bool, field: str, message: str) -> None:
    """Raise a ConfigError naming `field` unless `ok`; config `validate()` methods use this."""
    if not ok:
        raise ConfigError(f"{field}: {message}")
