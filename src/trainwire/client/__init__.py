"""The training-side library: :class:`~trainwire.client.run.Run` and its sender thread."""
