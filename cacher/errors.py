"""The cacher's own refusal: a build that cannot run as asked (the message says what to change, naming settings
fields as `{field}`; shared.errors)."""

from shared.errors import UserError


class BuildError(UserError):
    """A build that cannot run as asked; the message says what to change."""
