"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the data a user can fix.

    A subclass of ValueError so callers that validate configs can catch both the same way; the message is
    one line that names the file, field or package at fault and what was expected.
    """
