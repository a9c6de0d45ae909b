"""The cacher's own refusal: a build that cannot run as asked (the message says what to change)."""


class BuildError(ValueError):
    """A build that cannot run as asked; the message says what to change."""
