"""The base of the errors alphascope raises for its users.

Every error whose message is meant for a person (one line: what is wrong and how to fix it) derives from
`AlphascopeError`, so a script catches them all with `except AlphascopeError`; anything else is a bug. Each
module's own class also derives from ValueError (a bad input) or RuntimeError (the environment: a hub out of
reach, a locked run store), so code that catches those keeps working.
"""


class AlphascopeError(Exception):
    """A problem the user can fix, or must know of; the message says which."""


def and_more(items) -> str:
    """" (and N more)" after the first of `items` that a message names, or nothing when it is the only one."""
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""
