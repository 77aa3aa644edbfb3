"""Errors raised by the store: the message says what is wrong and how to repair it."""


class StoreError(Exception):
    """The store cannot be created, opened, read or written as asked."""


class ManifestError(StoreError):
    """The manifest is missing, unreadable, from a newer schema, or does not match the store."""


class ManifestUnreadable(ManifestError):
    """manifest.json is absent or not JSON: a store half-copied or broken mid-write."""


class StoreOutdatedError(StoreError):
    """A store written by an older dwq-pipeline, in a layout this one no longer reads."""


class StoreMismatchError(StoreError):
    """An existing store was made with other inputs or settings than the ones asked for."""


class StoreCorruptError(StoreError):
    """Chunks are missing, incomplete or fail their checksums."""
