"""The contracts between processes, each defined once and imported by both sides: rows, the
broadcast wire format, the request, cache and control protocols, endpoint names, the stream table
(docs/architecture.md, \"Where each contract is defined\"). Only shm, numpy, orjson and the standard
library are imported here."""
