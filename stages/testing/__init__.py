"""Small real stages for the built-in topology and the engine's tests: a counting source, a
relay and a verifying sink that checks every sequence number of every stream."""
