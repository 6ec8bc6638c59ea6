"""The error a person can fix: bad input or configuration.

Raise `UserError` with one line that names the file, row or key, what was expected and the fix; `common.cli` turns it
into that line on stderr and exit code 2. This module imports nothing from `common`, so every module can raise it
(config, io, checkpoint, runs) without importing the command-line plumbing.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration. The message is one line naming the file/row/key, what was expected and the fix."""
