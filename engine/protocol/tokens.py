"""The kinds of shared secret a request may have to carry (engine/tokens.py keeps their values in the
runtime directory): ``lookup`` lets ingest make the cache replay a stream, ``operator`` lets the
CLI clear or snapshot the cache and cancel any stream."""

LOOKUP = "lookup"
OPERATOR = "operator"
