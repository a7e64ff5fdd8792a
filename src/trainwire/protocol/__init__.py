"""The pure core of the trainwire protocol: messages, sessions and pacing.

Nothing in this package imports a socket, thread, clock or database.
"""
